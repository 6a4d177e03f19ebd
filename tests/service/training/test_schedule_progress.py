import pytest

from service.runtime.optim import lr_at
from service.training.loop import step_checkpoint_due
from service.training.progress import ProgressMeter, format_duration


def test_warmup_then_cosine_to_min_lr():
    kw = dict(base_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)
    assert lr_at(110, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_progress_line_has_epoch_step_loss_throughput_and_eta():
    meter = ProgressMeter(total_steps=100)
    meter.update(images=640, steps=10)
    figures = meter.flush(step=10)
    assert figures["images_per_s"] > 0 and figures["eta_s"] >= 0
    line = meter.line(epoch=0, epochs=2, step=10, loss=0.5, lr=1e-3, figures=figures)
    assert line.startswith("epoch 1/2 step 10/100 loss 0.5000")
    assert "img/s" in line and "eta " in line
    assert format_duration(3725) == "1:02:05"


def test_throughput_counts_training_time_only():
    now = [100.0]
    meter = ProgressMeter(total_steps=100, clock=lambda: now[0])
    meter.update(images=640, steps=10)
    now[0] += 2.0  # ten training steps
    with meter.excluded():
        now[0] += 8.0  # validation and a checkpoint
    figures = meter.flush(step=10)
    assert figures["images_per_s"] == pytest.approx(320.0) and figures["step_time_s"] == pytest.approx(0.2)
    assert figures["eta_s"] == pytest.approx(90.0)  # the run's pace, pauses included: 1 s a step
    meter.update(images=64, steps=1)
    now[0] += 0.5  # the next window holds none of the excluded time
    assert meter.flush(step=11)["images_per_s"] == pytest.approx(128.0)


def test_step_cadence_leaves_an_epochs_last_step_to_the_epoch_end_checkpoint():
    # 50 steps per epoch, every 25 steps: 25 mid-epoch, 50 by the epoch end only, 75 mid-epoch.
    due = [s for s in range(1, 101) if step_checkpoint_due(s, 25, epoch_ended=s % 50 == 0)]
    assert due == [25, 75]
    assert step_checkpoint_due(50, 25, epoch_ended=False)  # a step that is not an epoch's last
