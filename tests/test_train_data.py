"""Training data: subset sizes larger than a split are capped with a warning."""

from __future__ import annotations

import logging

from seal_train.loop import load_training_data


def test_oversized_subsets_capped_with_warning(tiny_config, caplog):
    config = tiny_config(train_examples=999_999, val_examples=5_000)
    with caplog.at_level(logging.WARNING, logger="seal_train.loop"):
        data = load_training_data(config)

    assert len(data.train) == 10_000
    assert len(data.val) == 2_000
    messages = [record.getMessage() for record in caplog.records]
    assert "train_examples 999999 is more than the 10000 examples of the training set, so it is capped at 10000" in messages
    assert "val_examples 5000 is more than the 2000 examples of the validation set, so it is capped at 2000" in messages


def test_fitting_subsets_no_warning(tiny_config, caplog):
    config = tiny_config(train_examples=10_000, val_examples=64)
    with caplog.at_level(logging.WARNING, logger="seal_train.loop"):
        data = load_training_data(config)

    assert len(data.train) == 10_000
    assert len(data.val) == 64
    assert caplog.records == []
