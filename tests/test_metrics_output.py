"""A run's metrics outputs: a resumed run adds only its new epochs to TensorBoard, and curves.png draws what
changes, each baseline and interval with the metric it qualifies, epochs counted from 1 as in the log."""
import matplotlib.pyplot as plt
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engine.metrics import MetricsWriter


def row(epoch):
    return {"epoch": epoch, "time_s": 1.0, "lr": 0.1, "train/skipped_steps": 0, "train/loss": 1 / (epoch + 1),
            "val/5shot": 0.5 + 0.05 * epoch, "val/5shot_ci95": 0.03 + 0.01 * epoch, "gen/nmi": 0.3 + 0.1 * epoch,
            "gen/nmi_trivial": 0.2, "gen/nmi_within": 0.1 * epoch, "gen/nmi_within_chance": 0.02 * epoch}


def scalar_steps(board, tag):
    steps = []
    for events in sorted(board.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            steps += [event.step for event in accumulator.Scalars(tag)]
    return sorted(steps)


def test_a_resumed_run_adds_only_its_new_epochs_to_tensorboard(tmp_path):
    writer = MetricsWriter(tmp_path)
    for epoch in (0, 1):
        writer.write(row(epoch))
    writer.close()
    resumed = MetricsWriter(tmp_path, [row(0), row(1)])
    resumed.write(row(2))
    resumed.close()
    assert scalar_steps(tmp_path / "tensorboard", "train/loss") == [0, 1, 2]
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 4
    elsewhere = tmp_path / "new_folder"  # a continued run in a new run directory: the whole history there
    MetricsWriter(elsewhere, [row(0), row(1)]).close()
    assert scalar_steps(elsewhere / "tensorboard", "train/loss") == [0, 1]


def test_curves_draw_what_changes_with_its_baselines_and_bands_from_epoch_1(tmp_path):
    writer = MetricsWriter(tmp_path)
    for epoch in range(4):
        writer.write(row(epoch))
    fig = writer.figure()
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert set(panels) == {"loss", "5shot", "nmi", "nmi_within"}  # no lr, skipped_steps, baseline or ci95 panels
    assert [line.get_label() for line in panels["nmi"].get_lines()] == ["gen/nmi", "gen/nmi_trivial"]
    assert [line.get_label() for line in panels["nmi_within"].get_lines()] == ["gen/nmi_within",
                                                                              "gen/nmi_within_chance"]
    assert panels["nmi"].get_lines()[1].get_linestyle() == "--"
    [band] = panels["5shot"].collections  # val/5shot_ci95 as a band around val/5shot
    top = band.get_paths()[0].vertices[:, 1].max()
    assert abs(top - (0.65 + 0.06)) < 1e-9
    assert list(panels["loss"].get_lines()[0].get_xdata()) == [1, 2, 3, 4]
    assert all(float(t).is_integer() for t in panels["loss"].get_xticks())
    assert "constant: lr=0.1, train/skipped_steps=0" in [text.get_text() for text in fig.texts]
    plt.close(fig)
    assert writer.plot() == tmp_path / "curves.png"
    writer.close()


def test_one_epoch_draws_no_curves(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write(row(0))
    assert writer.figure() is None and writer.plot() is None and not (tmp_path / "curves.png").exists()
    writer.close()
