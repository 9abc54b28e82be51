"""Leakage between pretraining and federation: a backbone must not have seen the data it is judged on.

A backbone made by ``fedsq-pretrain`` records in its JSON sidecar the dataset and split it was pretrained
on (``source_data``). A run whose ``train-split`` (the federated pool and the server's validation split
come from it) or ``test-split`` shares rows with that split of the same dataset stops before any
training, unless ``allow-pretrain-overlap=true`` says the overlap is known and wanted. The calibration
proxy split of ``fedsq-pretrain --calibrate`` is held to the same rule.

That check is by name. A node's own data (a silo's ``data-path``) has no name the server could compare,
so each ClientApp also checks by content (``check_content_overlap``): the sidecar carries a 64-bit digest
of every pretraining image (``fedsq_app.data.digests``) and the node refuses to train on data that holds
any of them, unless its node config says ``allow-pretrain-overlap=true``.
"""

from __future__ import annotations

import json
from logging import WARNING
from pathlib import Path

from flwr.common.logger import log

from fedsq_app.data import digests
from fedsq_app.data.sources import DataError, parse_source
from fedsq_app.data.splits import load_dataset_split, parse_classes, parse_split, slice_range
from fedsq_app.util import ConfigError


def same_dataset(a: str, b: str) -> bool:
    """Two ``dataset`` values naming the same data (``idx:/d`` and ``/d`` are one; a vanished path is
    compared by its text)."""
    if a == b:
        return True
    try:
        return parse_source(a) == parse_source(b)
    except DataError:
        return False


def shared_rows(dataset: str, split_a: str, split_b: str, *, image_column: str = "",
                label_column: str = "") -> range:
    """The rows (of the named split) that two split specs of one dataset both select; empty if disjoint.

    Different split names are disjoint ("pretrain" vs "train", "train" vs "test"). Slices of one split
    are resolved against its length, which needs the split loaded, but only then."""
    name_a, start_a, stop_a = parse_split(split_a)
    name_b, start_b, stop_b = parse_split(split_b)
    if name_a != name_b:
        return range(0)
    if not (start_a or stop_a or start_b or stop_b):
        return range(1 << 62)  # both whole: everything is shared, whatever the length
    length = len(load_dataset_split(dataset, name_a, image_column=image_column, label_column=label_column))
    rows_a, rows_b = slice_range(length, start_a, stop_a), slice_range(length, start_b, stop_b)
    return range(max(rows_a.start, rows_b.start), min(rows_a.stop, rows_b.stop))


def pretraining_source(checkpoint: str) -> dict | None:
    """``{"dataset", "split", ...}`` from a checkpoint's sidecar; None if it records none ('imagenet',
    'none', or a file without a fedsq-pretrain sidecar: nothing to compare with)."""
    sidecar = Path(f"{checkpoint}.json")
    if checkpoint in ("imagenet", "none") or not sidecar.is_file():
        return None
    source = json.loads(sidecar.read_text()).get("source_data")
    return source if isinstance(source, dict) and source.get("dataset") and source.get("split") else None


def overlaps(checkpoint: str, dataset: str, splits: dict[str, str], *, image_column: str = "",
             label_column: str = "", classes: str = "") -> list[str]:
    """One line per ``splits`` entry (what it is called -> split spec) that shares rows with the split
    ``checkpoint`` was pretrained on. Rows of disjoint label subsets (``fedsq-pretrain --classes`` and the
    run's ``classes``) are different samples: no overlap."""
    source = pretraining_source(checkpoint)
    if source is None or not same_dataset(source["dataset"], dataset):
        return []
    pretrained_on, used = set(parse_classes(source.get("label_subset") or "")), set(parse_classes(classes))
    if pretrained_on and used and not pretrained_on & used:
        return []
    found = []
    for what, split in splits.items():
        rows = shared_rows(dataset, source["split"], split, image_column=image_column, label_column=label_column)
        if len(rows):
            extent = "all of it" if len(rows) >= 1 << 61 else f"rows {rows.start}..{rows.stop - 1}"
            found.append(f"{what} '{split}' overlaps the pretraining split '{source['split']}' ({extent})")
    return found


def check_pretrain_overlap(config, checkpoint: str) -> list[str]:
    """Stop a run whose train or test split overlaps the backbone's pretraining data (``ConfigError``
    naming both), unless ``allow-pretrain-overlap``; returns the overlaps that were allowed. ``config``: the
    RunConfig."""
    found = overlaps(checkpoint, config.dataset, {"train-split": config.train_split, "test-split": config.test_split},
                     image_column=config.image_column, label_column=config.label_column, classes=config.classes)
    if found and not config.allow_pretrain_overlap:
        raise ConfigError(f"the backbone {checkpoint} was pretrained on dataset "
                          f"'{pretraining_source(checkpoint)['dataset']}', which is this run's dataset "
                          f"'{config.dataset}': "
                          + "; ".join(found) + ". Its weights have seen these samples, so accuracy on them is not "
                          "a federated result. Use disjoint splits (e.g. train-split='train[6000:]' after "
                          "pretraining on 'train[:6000]'), or set allow-pretrain-overlap=true to run anyway")
    if found:
        log(WARNING, "allow-pretrain-overlap=true: %s", "; ".join(found))
    return found


class PretrainOverlapError(ConfigError):
    """A node's data holds images the backbone was pretrained on (found by content)."""


def check_content_overlap(checkpoint: str, images, where: str, *, allow: bool = False) -> int | None:
    """How many of ``images`` (uint8, N×C×H×W) are among ``checkpoint``'s pretraining images, by content.

    Raises ``PretrainOverlapError`` naming the count and ``where`` (e.g. the silo's data-path) unless
    ``allow``; returns the count (0: disjoint), or None when the check could not run (no sidecar, or a
    sidecar written before digests were recorded: logged as a warning, never an error)."""
    if checkpoint in ("imagenet", "none"):
        return None  # not pretrained here: nothing recorded to compare with
    try:
        reference = digests.pretrain_digests(checkpoint)
    except (OSError, ValueError, KeyError) as error:
        log(WARNING, "leakage check by content could not run: the sidecar of %s is unreadable (%s)", checkpoint,
            error)
        return None
    if reference is None:
        log(WARNING, "leakage check by content could not run: the sidecar of %s records no digests of its "
            "pretraining images (written before they were recorded; `fedsq-prepare` adds them to the default "
            "backbone, `fedsq-pretrain` writes them for a new one)", checkpoint)
        return None
    found = digests.count_in(digests.image_digests(images), reference)
    if found and not allow:
        raise PretrainOverlapError(
            f"{found} of the {len(images)} images of {where} are among the {len(reference)} images the backbone "
            f"{checkpoint} was pretrained on (matched by content): training or validating on them is not a "
            "federated result. Remove them from this node's data, or set node config "
            "allow-pretrain-overlap=true to use them knowingly")
    if found:
        log(WARNING, "allow-pretrain-overlap=true: %d of the %d images of %s are pretraining images of %s",
            found, len(images), where, checkpoint)
    return found
