"""Stream prepared TFRecord shards through grain: random access, global shuffle per
epoch, sharding over JAX processes, multiprocess decode and augmentation, batches.

Batches leave the host as uint8 grayscale `[B, H, W, 1]`; normalization and the
1→3 channel broadcast happen on the device (`cxrjax.data.normalize`), which moves
12x fewer bytes per 1024 px image than float32 RGB would.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import grain.python as grain
import numpy as np
import pandas as pd
from absl import flags

from cxrjax.data import examples, tfrecord, worker_watch
from cxrjax.data.augment import AugmentConfig, random_affine
from cxrjax.data.images import decode_record_png, to_model_size
from cxrjax.data.metadata import IMAGE_METADATA
from cxrjax.data.prepare import INDEX, MANIFEST, PreparedDataError, read_manifest, sha256_of
from cxrjax.data.splits import keep_no_finding_fraction, oversample_repeats
from cxrjax.findings import FINDINGS


@dataclasses.dataclass(frozen=True)
class Balance:
    """Training-part imbalance options from the reference notebooks."""

    keep_no_finding: float = 1.0  # one reference notebook kept 0.2
    oversample_rare_below: float = 0.0  # prevalence under which a finding is "rare"
    oversample_factor: int = 1


REPAIR = "re-run `cxrjax prepare` with the same options to repair it"


def read_index(part_dir: str | Path) -> pd.DataFrame:
    """A part's index.csv, after checking it is the one `prepare` wrote: its sha256 and
    row count must match the manifest, so an edited or cut index never selects, drops
    or relabels records silently."""
    part_dir = Path(part_dir)
    path = part_dir / INDEX
    if not path.exists():
        raise PreparedDataError(f"{path} not found: is {part_dir} a part of a prepared dataset?")
    manifest_path = part_dir.parent / MANIFEST
    recorded = read_manifest(part_dir.parent).get("parts", {}).get(part_dir.name, {})
    if "index_sha256" not in recorded:
        raise PreparedDataError(
            f"{manifest_path} records no checksum of {path} (an older or unfinished prepare); {REPAIR}"
        )
    if sha256_of(path) != recorded["index_sha256"]:
        with open(path, "rb") as f:
            rows = max(sum(1 for _ in f) - 1, 0)
        raise PreparedDataError(
            f"{path} was changed after `prepare` wrote it ({rows} rows, {manifest_path} "
            f"says {recorded.get('images')} images; sha256 differs); {REPAIR}"
        )
    return pd.read_csv(path, dtype={"image_id": str, "shard": str})


class ShardedRecords(grain.RandomAccessDataSource):
    """grain data source over one part's shards, by record offset.

    grain's own TFRecord support reads sequentially; global shuffling needs random
    access, which the prepare step's offset index gives. File handles are opened
    lazily per process, so the source pickles cleanly into grain's workers.
    """

    def __init__(self, part_dir: str | Path, table: pd.DataFrame | None = None, verify_crc: bool = True):
        self.part_dir = Path(part_dir)
        table = read_index(self.part_dir) if table is None else table
        self.image_ids = table["image_id"].to_numpy()
        self.shards = sorted(table["shard"].unique())
        shard_of = {s: i for i, s in enumerate(self.shards)}
        self.shard_index = table["shard"].map(shard_of).to_numpy(np.int32)
        self.offsets = table["offset"].to_numpy(np.int64)
        self.verify_crc = verify_crc
        self._files: dict[int, int] = {}
        self._pid = None
        self._check_shard_sizes(table)

    def _check_shard_sizes(self, table: pd.DataFrame) -> None:
        """A deleted or cut shard fails here, before any training or prediction starts."""
        ends = (table["offset"] + table["length"]).groupby(table["shard"]).max()
        for shard, end in ends.items():
            path = self.part_dir / shard
            try:
                size = path.stat().st_size
            except OSError as e:
                raise PreparedDataError(f"{path}: cannot read ({e.strerror}); {REPAIR}") from None
            if size < end:
                raise PreparedDataError(f"{path}: {size} bytes, its records end at byte {end} (truncated); {REPAIR}")

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"], state["_pid"] = {}, None
        return state

    def _file(self, shard: int):
        if self._pid != os.getpid():  # forked or unpickled: never share file offsets
            self._files, self._pid = {}, os.getpid()
        fd = self._files.get(shard)
        if fd is None:  # grain reads from threads: keep the first fd opened, close the rest
            fd = os.open(self.part_dir / self.shards[shard], os.O_RDONLY)
            kept = self._files.setdefault(shard, fd)
            if kept != fd:
                os.close(fd)
            fd = kept
        return fd

    def __getitem__(self, key: int) -> dict:
        key = int(key)
        shard = int(self.shard_index[key])
        path, offset = self.part_dir / self.shards[shard], int(self.offsets[key])
        try:
            payload = tfrecord.read_at(self._file(shard), offset, str(path), self.verify_crc)
            record = examples.decode(payload, f"{path}: record at byte {offset}")
        except OSError as e:
            raise PreparedDataError(f"{path}: cannot read ({e.strerror}); {REPAIR}") from None
        except (tfrecord.RecordError, examples.DecodeError) as e:  # one-line, picklable across grain workers
            raise PreparedDataError(f"{e}; the shard is damaged: {REPAIR}") from None
        if record.image_id != self.image_ids[key]:
            raise PreparedDataError(
                f"{path}: the index says {self.image_ids[key]} at byte {offset}, the shard holds "
                f"{record.image_id}; {REPAIR}"
            )
        return {"png": record.image_png, "labels": record.labels, "key": key}

    def __repr__(self) -> str:
        return f"ShardedRecords({self.part_dir}, {len(self)} records)"


class RecordRange(grain.RandomAccessDataSource):
    """Records [start, stop) of a source; elements keep their keys (record indices)."""

    def __init__(self, source: grain.RandomAccessDataSource, start: int, stop: int):
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> dict:
        return self.source[self.start + int(i)]

    def __repr__(self) -> str:
        return f"RecordRange({self.source!r}, {self.start}, {self.stop})"


def process_range(n: int, process_index: int, process_count: int) -> tuple[int, int]:
    """A process's contiguous share of n records; the first n % P processes take one more."""
    per, extra = divmod(n, process_count)
    start = process_index * per + min(process_index, extra)
    return start, start + per + (process_index < extra)


def training_table(part_dir: str | Path, balance: Balance, seed: int) -> pd.DataFrame:
    """The train part's index after dropping No Finding rows and repeating rare ones."""
    table = read_index(part_dir)
    if balance.keep_no_finding < 1:
        table = keep_no_finding_fraction(table, balance.keep_no_finding, seed)
    if balance.oversample_factor > 1:
        repeats = oversample_repeats(table, balance.oversample_rare_below, balance.oversample_factor)
        table = table.loc[table.index.repeat(repeats)]
    return table.reset_index(drop=True)


@dataclasses.dataclass(frozen=True)
class DecodeAndAugment(grain.RandomMapTransform):
    """PNG → uint8 [size, size, 1], with a random affine when `augment` is set."""

    image_size: int
    augment: AugmentConfig | None = None

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        worker_watch.start()  # in a grain worker: end with the trainer, even a SIGKILLed one
        image = to_model_size(decode_record_png(element["png"]), self.image_size)
        if self.augment is not None:
            image = random_affine(image, self.augment, rng)
        return {"image": image[..., None], "labels": element["labels"], "key": np.int64(element["key"])}


EPOCHS_LIMIT = 1_000_000  # training streams are this many epochs long: forever, in practice


class EpochBatches(grain.RandomAccessDataSource):
    """Training batches, each a grain item, so that an epoch is exactly one pass.

    Item i is this process's share of global batch j = i % steps of epoch e = i // steps:
    records perm_e[j*G + p*B : j*G + (p+1)*B] of a seeded permutation perm_e of all the
    records, fresh each epoch (G = B * processes; the last partial global batch of each
    epoch is dropped). grain batching inside its worker processes would instead batch each
    worker's own stride of the record stream, whose batches run across the epoch boundary
    (with 2 workers, records seen twice and others missed in an epoch). Whole batches as
    items keep the epochs exact for any number of workers and processes.
    """

    def __init__(self, source, batch_size: int, seed: int, process_index: int, process_count: int, steps=None):
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.process_index, self.global_batch = process_index, batch_size * process_count
        full = len(source) // self.global_batch
        self.steps = min(full, steps) if steps else full
        if self.steps < 1:
            raise ValueError(f"{len(source)} records are fewer than one global batch of {self.global_batch}")
        self._permutation = (None, None)

    def __len__(self) -> int:
        return self.steps * EPOCHS_LIMIT

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_permutation"] = (None, None)
        return state

    def keys(self, i: int) -> np.ndarray:
        epoch, j = divmod(int(i), self.steps)
        if self._permutation[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
            self._permutation = (epoch, order)
        start = j * self.global_batch + self.process_index * self.batch_size
        return self._permutation[1][start : start + self.batch_size]

    def __getitem__(self, i: int) -> dict:
        return {"records": [self.source[int(k)] for k in self.keys(i)]}

    def __repr__(self) -> str:
        return f"EpochBatches({self.source!r}, {self.steps} steps of {self.global_batch})"


@dataclasses.dataclass(frozen=True)
class DecodeBatch(grain.RandomMapTransform):
    """An `EpochBatches` item → a batch, each record through `DecodeAndAugment`."""

    image_size: int
    augment: AugmentConfig | None = None

    def __setstate__(self, state: dict) -> None:
        # Unpickled in a grain worker as it starts: watch the trainer from then on, not from
        # the first batch this worker decodes (a worker that has not decoded yet when the
        # trainer is killed would wait for work forever).
        self.__dict__.update(state)
        worker_watch.start()

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        decode = DecodeAndAugment(self.image_size, self.augment)
        out = [decode.random_map(record, rng) for record in element["records"]]
        return {name: np.stack([o[name] for o in out]) for name in ("image", "labels", "key")}


def make_loader(
    source: grain.RandomAccessDataSource,
    *,
    batch_size: int,
    image_size: int,
    seed: int,
    train: bool,
    augment: AugmentConfig | None = None,
    workers: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
    steps_per_epoch: int | None = None,
) -> grain.DataLoader:
    """A grain DataLoader yielding this process's share of each global batch.

    `batch_size` is per process. Training repeats forever: epoch e is batches
    [e*S, (e+1)*S), exactly one pass over a fresh seeded shuffle of the records, with
    any number of `workers` (`EpochBatches`); S is the number of whole global batches,
    or `steps_per_epoch` when that is smaller (then each epoch starts a new shuffle).
    The last n % (batch_size * P) records of each shuffle are left out. Evaluation
    reads each record once, in order, each process a contiguous range, and keeps the
    last partial batch.
    """
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if workers and not flags.FLAGS.is_parsed():
        # grain's worker processes read absl flags; outside absl.app nobody parsed them.
        flags.FLAGS.mark_as_parsed()
    if train and num_epochs is None:
        batches = EpochBatches(source, batch_size, seed, process_index, process_count, steps_per_epoch)
        single = grain.ShardOptions(shard_index=0, shard_count=1)
        return grain.DataLoader(
            data_source=batches,
            sampler=grain.IndexSampler(len(batches), single, shuffle=False, num_epochs=1, seed=seed),
            operations=[DecodeBatch(image_size, augment)],
            worker_count=workers,
            shard_options=single,
        )
    if not train and process_count > 1:
        # grain's DataLoader gives each of P shards n // P records even without
        # drop_remainder, so evaluation would silently skip up to P - 1 records.
        source = RecordRange(source, *process_range(len(source), process_index, process_count))
        process_index, process_count = 0, 1
    shard = grain.ShardOptions(shard_index=process_index, shard_count=process_count, drop_remainder=train)
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=shard,
        shuffle=train,
        num_epochs=num_epochs if num_epochs is not None else (None if train else 1),
        seed=seed,
    )
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[
            DecodeAndAugment(image_size, augment if train else None),
            grain.Batch(batch_size, drop_remainder=train),
        ],
        worker_count=workers,
        shard_options=shard,
    )


def labels_table(image_ids, labels: np.ndarray, part_dir: str | Path | None = None) -> pd.DataFrame:
    """Ground truth for evaluation from the records' own labels [N, 14] (FINDINGS order),
    with the patient id and per-image metadata (sex, age, view) of `part_dir`'s index.csv,
    which `read_index` checks against the manifest first."""
    table = pd.DataFrame(np.asarray(labels).astype(np.int8), columns=list(FINDINGS))
    table.insert(0, "image_id", np.asarray(image_ids, dtype=object))
    if part_dir is None:
        return table
    index = read_index(part_dir).set_index("image_id")
    columns = [c for c in ("patient_id", *IMAGE_METADATA) if c in index.columns]  # older folders lack some
    return pd.concat([table, index.loc[table["image_id"], columns].reset_index(drop=True)], axis=1)


def record_labels(part_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(image ids, labels [N, 14]) of every record of a part, read from the shards."""
    source = ShardedRecords(part_dir)
    labels = [source[k]["labels"] for k in range(len(source))]
    return source.image_ids, np.stack(labels) if labels else np.zeros((0, len(FINDINGS)), np.float32)
