"""The training engine (train/engine.py) on a toy job: exact resume, what an existing run directory means,
one-line errors. Classifier and denoiser runs through it are covered in test_train.py and test_denoiser.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from smoothtransfer.errors import UserError
from smoothtransfer.train.engine import CHECKPOINT, Job, StepOutput, open_run, read_train_state, train

N, BATCH, EPOCHS = 20, 4, 2  # 5 steps per epoch


class NoisyRegression(nn.Module):
    """``x (B,3)`` → MSE of a linear model on ``x`` plus fresh noise (so the step draws from the global RNG)."""

    def __init__(self, model: nn.Module, scale: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.scale = scale

    def forward(self, x: torch.Tensor) -> StepOutput:
        pred = self.model(x + 0.1 * torch.randn_like(x))
        loss = self.scale * (pred - x.sum(1, keepdim=True)).pow(2).mean()
        return StepOutput(loss, {"pred_mean": float(pred.detach().mean())})


def make_job(out, epochs=EPOCHS, scale=1.0, settings="a") -> Job:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    data = torch.randn(N, 3, generator=torch.Generator().manual_seed(1))
    return Job(out=out, label="toy", model=model, step=NoisyRegression(model, scale), optimizer=opt,
               params=list(model.parameters()), get_batch=lambda idx: (data[idx],), n_train=N, batch_size=BATCH,
               epochs=epochs, order_seed=lambda e: 10 + e, device=torch.device("cpu"), scheduler=sched,
               save_info={"classes": None, "dataset": "toy", "config": {"settings": settings},
                          "model_spec": {"toy": True}},
               grad_clip=1.0, checkpoint_every=2, progress=False)


def check(settings):
    def f(saved):
        if saved.get("settings") != settings:
            raise UserError("other settings")
    return f


def ckpt(out):
    return torch.load(out / CHECKPOINT, weights_only=True)


@pytest.mark.parametrize("stop_after", [2, 3, 5, 7])
def test_resume_is_exact(tmp_path, stop_after):
    train(make_job(tmp_path / "a"))
    ref = ckpt(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        train(make_job(tmp_path / "b"), _stop_after_steps=stop_after)
    st = read_train_state(tmp_path / "b")
    assert not st["finished"] and (st["epoch"], st["step_in_epoch"]) == divmod(stop_after, N // BATCH)
    torch.manual_seed(123)  # the caller's RNG at resume time does not matter: the checkpoint's is restored
    existing = open_run(tmp_path / "b", epochs=EPOCHS, resume=True, check_settings=check("a"))
    train(make_job(tmp_path / "b"), existing)
    got = ckpt(tmp_path / "b")
    for k in ref["state_dict"]:
        assert torch.equal(ref["state_dict"][k], got["state_dict"][k])
    strip = [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in ref["train_state"]["history"]]
    assert strip == [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")}
                     for r in got["train_state"]["history"]]
    assert got["train_state"]["finished"] and got["train_state"]["scheduler"] == ref["train_state"]["scheduler"]
    assert {"train_loss", "train_pred_mean"} <= set(got["train_state"]["history"][0])


def test_open_run(tmp_path):
    out = tmp_path / "run"
    assert open_run(out, epochs=EPOCHS, resume=False, check_settings=check("a")) is None
    assert read_train_state(out) is None
    with pytest.raises(KeyboardInterrupt):
        train(make_job(out), _stop_after_steps=1)
    with pytest.raises(UserError, match="interrupted run: pass --resume to continue it \\(or --overwrite\\)"):
        open_run(out, epochs=EPOCHS, resume=False, check_settings=check("a"))
    with pytest.raises(UserError, match="other settings"):  # checked before anything else, resume or not
        open_run(out, epochs=EPOCHS, resume=True, check_settings=check("b"))
    assert open_run(out, epochs=EPOCHS, resume=False, overwrite=True, check_settings=check("b")) is None
    train(make_job(out), open_run(out, epochs=EPOCHS, resume=True, check_settings=check("a")))
    done = open_run(out, epochs=EPOCHS, resume=False, check_settings=check("a"))
    assert done["train_state"]["finished"]  # reused as it is
    # where the settings allow more epochs, a finished run continues with resume only
    with pytest.raises(UserError, match="finished run of fewer epochs"):
        open_run(out, epochs=EPOCHS + 1, resume=False, check_settings=check("a"))
    more = open_run(out, epochs=EPOCHS + 1, resume=True, check_settings=check("a"))
    assert not more["train_state"]["finished"]
    history = train(make_job(out, epochs=EPOCHS + 1), more)
    assert [h["epoch"] for h in history] == [1, 2, 3] and read_train_state(out)["finished"]


def test_non_finite_loss_is_one_line(tmp_path):
    with pytest.raises(UserError, match="toy: the loss became nan at epoch 1, step 1; lower the learning rate"):
        train(make_job(tmp_path, scale=float("nan")))
