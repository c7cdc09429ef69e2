"""The record schema: one `tf.train.Example` per X-ray, built from the protos that
tensorflow-datasets ships, so cxrjax never imports TensorFlow."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from google.protobuf import message
from tensorflow_datasets.proto import tf_example_generated_pb2 as example_pb2

from cxrjax.errors import InputError
from cxrjax.findings import NUM_FINDINGS


@dataclass(frozen=True)
class XrayRecord:
    image_png: bytes
    image_id: str
    labels: np.ndarray  # float32 [14], FINDINGS order
    patient_id: int
    follow_up: int
    view: str
    age: int
    sex: str


def encode(record: XrayRecord) -> bytes:
    ex = example_pb2.Example()
    f = ex.features.feature
    f["image/png"].bytes_list.value.append(record.image_png)
    f["image/id"].bytes_list.value.append(record.image_id.encode())
    f["labels"].float_list.value.extend(np.asarray(record.labels, np.float32).tolist())
    f["patient_id"].int64_list.value.append(int(record.patient_id))
    f["follow_up"].int64_list.value.append(int(record.follow_up))
    f["view"].bytes_list.value.append(record.view.encode())
    f["age"].int64_list.value.append(int(record.age))
    f["sex"].bytes_list.value.append(record.sex.encode())
    # Map fields serialize in a per-process hash order unless asked to sort: without
    # this a rerun (or another worker) writes different bytes for the same record.
    return ex.SerializeToString(deterministic=True)


class DecodeError(InputError):
    """A record payload that is not a whole cxrjax example (only reachable when the
    CRC was not checked, or the writer was not cxrjax)."""


def decode(payload: bytes, source: str = "record") -> XrayRecord:
    try:
        ex = example_pb2.Example.FromString(payload)
        f = ex.features.feature
        labels = np.asarray(f["labels"].float_list.value, np.float32)
        if labels.shape != (NUM_FINDINGS,):
            raise DecodeError(f"{source}: record {f['image/id'].bytes_list.value[:1]} has {labels.shape} labels")
        return XrayRecord(
            image_png=f["image/png"].bytes_list.value[0],
            image_id=f["image/id"].bytes_list.value[0].decode(),
            labels=labels,
            patient_id=f["patient_id"].int64_list.value[0],
            follow_up=f["follow_up"].int64_list.value[0],
            view=f["view"].bytes_list.value[0].decode(),
            age=f["age"].int64_list.value[0],
            sex=f["sex"].bytes_list.value[0].decode(),
        )
    except (message.DecodeError, IndexError, UnicodeDecodeError) as e:
        raise DecodeError(f"{source}: not a readable example ({type(e).__name__}: {e})") from None
