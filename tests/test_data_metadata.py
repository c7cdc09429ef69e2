"""NIH metadata parsing: the real label file against an independent pandas count, and
bad rows that must fail with the file and row named."""

import functools
import gzip

import numpy as np
import pandas as pd
import pytest

from cxrjax.data.metadata import MetadataError, find_metadata, label_matrix, read_metadata
from cxrjax.findings import FINDINGS

HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position"
ROWS = [
    "00000001_000.png,Cardiomegaly|Infiltrate,0,1,58,M,PA",
    "00000001_001.png,No Finding,1,1,059Y,M,AP",
    "00000002_000.png,Hernia|Pleural_Thickening|Atelectasis,0,2,40,F,PA",
]


def _csv(path, rows, header=HEADER):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


@functools.cache
def _read_real(nih_dir):
    path = find_metadata(nih_dir)
    return path, read_metadata(path)


@pytest.fixture
def real_table(nih_dir):
    return _read_real(nih_dir)  # parsed once per session (2 s)


def test_real_file_counts_and_columns(real_table):
    path, table = real_table
    assert path.name == "Data_Entry_2017_v2020.csv.gz"
    assert len(table) == 112_120
    assert table["patient_id"].nunique() == 30_805
    assert list(table.columns) == ["image_id", "patient_id", "follow_up", "age", "sex", "view", "no_finding", *FINDINGS]
    assert set(np.unique(label_matrix(table))) == {0, 1}
    assert set(table["sex"]) == {"M", "F"} and set(table["view"]) == {"PA", "AP"}


def test_real_frequencies_equal_pandas_substring_counts(real_table):
    path, table = real_table
    raw = pd.read_csv(path)  # independent reading: pandas' own types and gzip handling
    assert table["image_id"].tolist() == raw["Image Index"].tolist()
    for name in FINDINGS:
        expected = raw["Finding Labels"].str.contains(name, regex=False).sum()
        assert table[name].sum() == expected, name
    assert table["no_finding"].sum() == (raw["Finding Labels"] == "No Finding").sum()
    assert (table["patient_id"].to_numpy() == raw["Patient ID"].to_numpy()).all()
    assert (table["age"].to_numpy() == raw["Patient Age"].to_numpy()).all()
    assert (table["follow_up"].to_numpy() == raw["Follow-up #"].to_numpy()).all()
    # A No Finding row has no finding, and every other row has at least one.
    assert ((label_matrix(table).sum(1) == 0) == table["no_finding"].to_numpy()).all()


def test_small_file_parsed_by_name_with_aliases_and_age_units(tmp_path):
    table = read_metadata(_csv(tmp_path / "Data_Entry_2017.csv", ROWS))
    assert table["image_id"].tolist() == ["00000001_000.png", "00000001_001.png", "00000002_000.png"]
    y = label_matrix(table)
    assert y.shape == (3, 14)
    assert {FINDINGS[j] for j in np.flatnonzero(y[0])} == {"Cardiomegaly", "Infiltration"}
    assert y[1].sum() == 0 and table["no_finding"].tolist() == [False, True, False]
    assert {FINDINGS[j] for j in np.flatnonzero(y[2])} == {"Hernia", "Pleural_Thickening", "Atelectasis"}
    assert table["age"].tolist() == [58, 59, 40]
    assert table["patient_id"].tolist() == [1, 1, 2] and table["follow_up"].tolist() == [0, 1, 0]
    assert table["sex"].tolist() == ["M", "M", "F"] and table["view"].tolist() == ["PA", "AP", "PA"]


def test_gzipped_and_plain_files_parse_alike_and_newest_revision_is_found(tmp_path):
    plain = _csv(tmp_path / "Data_Entry_2017.csv", ROWS)
    gz = tmp_path / "Data_Entry_2017_v2020.csv.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    pd.testing.assert_frame_equal(read_metadata(plain), read_metadata(gz))
    assert find_metadata(tmp_path) == gz
    with pytest.raises(MetadataError, match="no Data_Entry_2017"):
        find_metadata(tmp_path / "nothing-here")


@pytest.mark.parametrize(
    "row, message",
    [
        ("00000003_000.png,Fracture,0,3,40,F,PA", r"row 3: label 'Fracture' is not one of the 14"),
        ("00000003_000.png,Mass|No Finding,0,3,40,F,PA", r"row 3: 'No Finding' combined"),
        ("00000003_000.png,,0,3,40,F,PA", r"row 3: label '' is not one of"),
        ("00000001_000.png,Mass,0,1,40,F,PA", r"row 3: duplicated image id '00000001_000.png'"),
        ("00000003_000.png,Mass,0,3,forty,F,PA", r"row 3: unreadable Patient Age 'forty'"),
        ("00000003_000.png,Mass,0,3,-4,F,PA", r"row 3: unreadable Patient Age '-4'"),
        ("00000003_000.png,Mass,0,3,40,X,PA", r"row 3: Patient Gender 'X' is not M or F"),
        ("00000003_000.png,Mass,0,x3,40,F,PA", r"row 3: Patient ID 'x3' is not a whole number"),
        ("00000003_000.png,Mass,one,3,40,F,PA", r"row 3: Follow-up # 'one' is not a whole number"),
        ("00000003_000.png,Mass,0,4,40,F,PA", r"row 3: Patient ID 4 does not match image id '00000003_000.png'"),
        ("scan3.png,Mass,0,3,40,F,PA", r"row 3: image id 'scan3.png' is not an NIH file name"),
    ],
)
def test_bad_row_is_named(tmp_path, row, message):
    path = _csv(tmp_path / "Data_Entry_2017.csv", [ROWS[0], row])
    with pytest.raises(MetadataError, match=message) as info:
        read_metadata(path)
    assert str(path) in str(info.value)


def test_missing_column_and_missing_file_are_named(tmp_path):
    header = HEADER.replace(",View Position", "")
    path = _csv(tmp_path / "Data_Entry_2017.csv", [r.rsplit(",", 1)[0] for r in ROWS], header)
    with pytest.raises(MetadataError, match=r"Data_Entry_2017.csv: missing column\(s\) \['View Position'\]"):
        read_metadata(path)
    with pytest.raises(MetadataError, match="absent.csv: metadata file not found"):
        read_metadata(tmp_path / "absent.csv")
