"""Whole training epochs outside the engine's loop, for tests that call the library directly: each step function
over every batch of a loader (a list of batches will do), with the means and totals the engine would log."""
from engine.metrics import MeanTracker
from methods.meta_ls import meta_train_step
from methods.supervised import supervised_train_step


def train_epoch(step, model, loader, optimizer, session) -> dict[str, float]:
    """`step(model, batch, optimizer, session, tracker)` over every batch of `loader`: the tracker's result."""
    tracker = MeanTracker()
    for batch in loader:
        step(model, batch, optimizer, session, tracker)
    return tracker.result(session)


def meta_train_epoch(learner, loader, optimizer, session) -> dict[str, float]:
    return train_epoch(meta_train_step, learner, loader, optimizer, session)


def supervised_train_epoch(model, loader, optimizer, session) -> dict[str, float]:
    return train_epoch(supervised_train_step, model, loader, optimizer, session)
