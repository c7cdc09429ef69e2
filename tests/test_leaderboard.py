"""Baselines table (checked against the markdown source) and the leaderboard."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrjax.cli import main
from cxrjax.eval.baselines import load_baselines
from cxrjax.eval.leaderboard import FAMILIES, LeaderboardError, leaderboard_table, read_run, write_leaderboard
from cxrjax.eval.runinfo import RunInfoError
from cxrjax.findings import FINDINGS

SHARED = Path(os.environ.get("CXRJAX_NIH_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "nih")).parent
BASELINES_MD = SHARED / "baselines.md"
# The markdown's column abbreviations, written out here independently of the package.
ABBREV = {
    "Atel": "Atelectasis",
    "Card": "Cardiomegaly",
    "Effu": "Effusion",
    "Infi": "Infiltration",
    "Mass": "Mass",
    "Nodu": "Nodule",
    "Pneu": "Pneumonia",
    "PTX": "Pneumothorax",
    "Cons": "Consolidation",
    "Edem": "Edema",
    "Emph": "Emphysema",
    "Fibr": "Fibrosis",
    "PT": "Pleural_Thickening",
    "Hern": "Hernia",
}


def _row(table, work_start):
    rows = table[table["work"].str.startswith(work_start)]
    assert len(rows) == 1, work_start
    return rows.iloc[0]


@pytest.mark.parametrize(
    "work, finding, value",
    [  # typed from /work/shared/baselines.md; the Fisher table is in a different column order
        ("Fisher 2025", "Cardiomegaly", 0.915),
        ("Fisher 2025", "Infiltration", 0.723),
        ("Fisher 2025", "Atelectasis", 0.816),
        ("Fisher 2025", "Hernia", 0.886),
        ("Rajpurkar 2017 (as cited", "Consolidation", 0.893),
        ("Rajpurkar 2017 (as cited", "Edema", 0.927),
        ("Rajpurkar et al. 2017 (CheXNet", "Consolidation", 0.7901),
        ("Rajpurkar et al. 2017 (CheXNet", "Edema", 0.8878),
        ("Bhusala", "Nodule", 0.655),
        ("Bhusala", "Mass", 0.867),
        ("Hasanah", "Hernia", 0.936),
        ("Hasanah", "Pneumonia", 0.810),
        ("Ahmad", "Atelectasis", 0.850),
        ("Ahmad", "Pleural_Thickening", 0.820),
        ("CheXNet reproduction", "Infiltration", 0.7156),
        ("Wang et al. 2017 (ChestX-ray8", "Pleural_Thickening", 0.6835),
        ("Hermoza", "Emphysema", 0.936),
    ],
)
def test_baseline_cells(work, finding, value):
    assert _row(load_baselines(), work)[finding] == value


def test_baseline_families_and_both_rajpurkar_rows():
    t = load_baselines()
    assert _row(t, "Rajpurkar et al. 2017 (CheXNet")["split_family"] == "random"
    assert _row(t, "Rajpurkar et al. 2017 (CheXNet")["mean"] == 0.8414
    assert _row(t, "Rajpurkar 2017 (as cited by Fisher 2025)")["mean"] == 0.852
    assert _row(t, "Fisher 2025")["split_family"] == "random"  # its write-up states 90/5/5 random
    unstated = t[t["split_family"] == "unstated"]["work"].tolist()
    assert len(unstated) == 4 and all("as cited by Fisher 2025" in w for w in unstated)
    assert (t[t["split_family"] == "official"]["tag"] == "secondary").all()
    assert len(t) == 13


def _markdown_tables(text):
    tables, current = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            current = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if current is None:
            current = {"header": cells, "rows": []}
            tables.append(current)
        elif not set("".join(cells)) <= set("-"):
            current["rows"].append(dict(zip(current["header"], cells)))
    return tables


@pytest.mark.skipif(not BASELINES_MD.exists(), reason=f"{BASELINES_MD} not present")
def test_every_baseline_cell_matches_the_markdown_source():
    t = load_baselines()
    rows = [r for table in _markdown_tables(BASELINES_MD.read_text()) for r in table["rows"]]
    assert len(rows) == len(t)
    for r in rows:
        key = re.sub(r" \(as cited\)$", " (as cited by Fisher 2025)", r["work"])
        ours = _row(t, key)
        for short, finding in ABBREV.items():
            assert ours[finding] == float(r[short]), (key, finding)
        assert ours["mean"] == float(r["mean"])
        if "px" in r:
            assert ours["px"] == r["px"]


# ----------------------------------------------------------------------- leaderboard


FULL = {"official": 25596, "random": 5000, "synthetic": 100}


def _run_dir(root, name, aucs, run=None, in_metrics=False, n_images=None):
    """A run folder; scored on its split's full test list unless `n_images` says otherwise."""
    d = root / name
    d.mkdir()
    defined = [v for v in aucs.values() if v is not None]
    if run is not None and run.get("split_family") == "random":
        run = {"test_images_full": FULL["random"], **run}
    family = (run or {}).get("split_family")
    n_images = n_images or FULL.get(family, 100)
    metrics = {"auc": aucs, "mean_auc": float(np.mean(defined)), "n_images": n_images, "n_patients": n_images // 2}
    metrics["mean_auc_ci"] = [metrics["mean_auc"] - 0.01, metrics["mean_auc"] + 0.01]
    if in_metrics:
        metrics["run"] = run
    elif run is not None:
        (d / "run.json").write_text(json.dumps(run))
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def _aucs(base, **overrides):
    return {f: overrides.get(f, base) for f in FINDINGS}


@pytest.fixture()
def board(tmp_path):
    runs = [
        _run_dir(
            tmp_path,
            "r1",
            _aucs(0.84),
            {"name": "s0", "replicate_group": "mine|v1", "split_family": "random", "px": 224},
        ),
        _run_dir(
            tmp_path,
            "r2",
            _aucs(0.86),
            {"name": "s1", "replicate_group": "mine|v1", "split_family": "random", "px": 224},
        ),
        _run_dir(
            tmp_path, "o1", _aucs(0.81, Hernia=None), {"name": "off", "split_family": "official"}, in_metrics=True
        ),
    ]
    paths = write_leaderboard(runs, tmp_path / "lb")
    return paths, pd.read_csv(paths["csv"], keep_default_na=False, na_values=[""])


def test_runs_ranked_only_within_their_family(board):
    _, t = board
    mine = t[t["entry"] == "mine|v1"].iloc[0]
    assert mine["split_family"] == "random" and mine["n_runs"] == 2
    assert mine["mean"] == pytest.approx(0.85) and mine["std_runs"] == pytest.approx(np.std([0.84, 0.86], ddof=1))
    random = t[t["split_family"] == "random"]
    better = (random["mean"] > 0.85).sum()  # Fisher 0.842 and Rajpurkar 0.8414 are below
    assert better == 0 and int(mine["rank"]) == 1
    off = t[t["entry"] == "off"].iloc[0]
    assert off["split_family"] == "official" and np.isnan(off["Hernia"])
    official = t[t["split_family"] == "official"].sort_values("mean", ascending=False)
    assert official["entry"].tolist()[:2] == ["Hermoza et al. 2020 (arXiv:2005.10550)", "off"]
    assert int(off["rank"]) == 2
    assert t[t["split_family"] == "unstated"]["rank"].isna().all()
    assert t["split_family"].map(FAMILIES.index).is_monotonic_increasing
    assert t.loc[t["entry"] == "off", "std_findings"].iloc[0] == pytest.approx(0.0)


def test_deltas_are_run_minus_baseline_of_same_family(board):
    paths, _ = board
    d = pd.read_csv(paths["deltas"])
    assert set(d["split_family"]) == {"random", "official"}
    row = d[(d["run"] == "mine|v1") & d["baseline"].str.startswith("Fisher")].iloc[0]
    assert row["Cardiomegaly"] == pytest.approx(0.85 - 0.915)
    assert row["Hernia"] == pytest.approx(0.85 - 0.886)
    assert not d["baseline"].str.contains("as cited by Fisher").any()  # unstated: never compared


def test_markdown_and_png(board):
    paths, _ = board
    md = paths["md"].read_text()
    assert "mine\\|v1" in md and "(2 replicates)" in md  # a '|' in a name cannot break the table
    assert md.index("## Official") < md.index("## Random") < md.index("## Split not stated")
    off_row = next(line for line in md.splitlines() if line.startswith("| 2 | **off**"))
    assert off_row.rstrip(" |").endswith("n/a")  # Hernia undefined
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_synthetic_runs_are_never_ranked_against_published_results(tmp_path):
    synthetic = _run_dir(tmp_path, "s", _aucs(0.98), {"name": "synthetic-demo", "split_family": "synthetic"})
    real = _run_dir(tmp_path, "o", _aucs(0.80), {"name": "off", "split_family": "official"})
    paths = write_leaderboard([synthetic, real], tmp_path / "lb")
    t = pd.read_csv(paths["csv"], keep_default_na=False, na_values=[""])
    group = t[t["split_family"] == "synthetic"]
    assert group["entry"].tolist() == ["synthetic-demo"] and group["rank"].tolist() == [1]
    official = t[t["split_family"] == "official"]
    assert int(official.loc[official["entry"] == "off", "rank"].iloc[0]) > 1  # below the baselines
    assert "synthetic-demo" not in set(pd.read_csv(paths["deltas"])["run"])  # no baseline to differ from
    md = paths["md"].read_text()
    assert md.index("## Official") < md.index("## Synthetic data") < md.index("## Split not stated")


def test_missing_split_family_is_a_clear_error(tmp_path, capsys):
    d = _run_dir(tmp_path, "r", _aucs(0.8))
    with pytest.raises(RunInfoError, match="split family is unknown; write run.json"):
        write_leaderboard([d], tmp_path / "lb")
    assert main(["leaderboard", str(d), "--out", str(tmp_path / "lb")]) == 2
    assert "split family is unknown" in capsys.readouterr().err
    bad = _run_dir(tmp_path, "b", _aucs(0.8), {"name": "x", "split_family": "unknown"})
    with pytest.raises(RunInfoError, match="'split_family' is 'unknown'"):
        write_leaderboard([bad], tmp_path / "lb")


def test_bad_metrics_and_conflicting_runs(tmp_path):
    with pytest.raises(LeaderboardError, match="no metrics.json"):
        write_leaderboard([tmp_path], tmp_path / "lb")
    d = _run_dir(tmp_path, "a", {"Mass": 0.8}, {"name": "a", "split_family": "random"})
    with pytest.raises(LeaderboardError, match="'auc' must map each of the 14 findings"):
        write_leaderboard([d], tmp_path / "lb")
    a = _run_dir(tmp_path, "c", _aucs(0.8), {"name": "a", "replicate_group": "g", "split_family": "random"})
    b = _run_dir(tmp_path, "d", _aucs(0.8), {"name": "b", "replicate_group": "g", "split_family": "official"})
    with pytest.raises(LeaderboardError, match="replicate group 'g'.* differ in split_family"):
        write_leaderboard([a, b], tmp_path / "lb")


def test_run_names_never_become_paths(tmp_path):
    d = _run_dir(tmp_path, "r", _aucs(0.8), {"name": "../../escape", "split_family": "random"})
    write_leaderboard([d], tmp_path / "lb")
    assert sorted(p.name for p in (tmp_path / "lb").iterdir()) == [
        "leaderboard.csv",
        "leaderboard.md",
        "leaderboard.png",
        "leaderboard_deltas.csv",
    ]
    assert not (tmp_path.parent / "escape").exists()


def test_subgroup_gap_and_adjudicated_sections_only_for_runs_that_carry_them(tmp_path):
    plain = _run_dir(tmp_path, "plain", _aucs(0.8), {"name": "plain", "split_family": "random"})
    rich = _run_dir(tmp_path, "rich", _aucs(0.82), {"name": "rich", "split_family": "random"})
    metrics = json.loads((rich / "metrics.json").read_text())
    metrics["subgroups"] = {
        "available": True,
        "worst_gap": {
            "attribute": "view",
            "high": "PA",
            "low": "AP",
            "gap": 0.015,
            "ci": [0.001, 0.028],
            "n_findings": 14,
        },
    }
    part = {
        "Fracture": {"auc": None},
        "Pneumothorax": {"auc": 0.9},
        "Airspace opacity": {"auc": 0.84},
        "Nodule or mass": {"auc": 0.86},
    }
    text = {**part, "Airspace opacity": {"auc": 0.75}}
    metrics["adjudicated"] = {"n_scored": 935, "sets": {"overall": {"adjudicated": part, "text_mined": text}}}
    (rich / "metrics.json").write_text(json.dumps(metrics))
    md = write_leaderboard([plain, rich], tmp_path / "lb")["md"].read_text()
    gap_rows = [line for line in md.splitlines() if line.startswith("| **") and ("view" in line or "935" in line)]
    assert len(gap_rows) == 2 and all("**rich**" in line for line in gap_rows)
    assert "| view | PA − AP | +0.015 | [0.001, 0.028] | 14 |" in gap_rows[0]
    assert "| 935 | n/a (n/a) | 0.900 (0.900) | 0.840 (0.750) | 0.860 (0.860) |" in gap_rows[1]
    assert "Published baselines report no subgroup results" in md
    md = write_leaderboard([plain], tmp_path / "lb2")["md"].read_text()
    assert "subgroup" not in md and "adjudicated" not in md
    metrics["subgroups"]["worst_gap"] = "large"
    (rich / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(LeaderboardError, match="subgroups.worst_gap is 'large'"):
        write_leaderboard([rich], tmp_path / "lb3")


def _md_section(md, start):
    return md[md.index(start) :].split("\n## ")[0]


def test_a_75_image_evaluation_shows_its_size_and_is_never_ranked_among_full_test_results(tmp_path, capsys):
    """Issue 21's "done when": the image count is shown and the 75-image row is not ranked."""
    part = _run_dir(tmp_path, "p", _aucs(0.90), {"name": "sample-75", "split_family": "official"}, n_images=75)
    full = _run_dir(tmp_path, "f", _aucs(0.80), {"name": "full", "split_family": "official"})
    assert main(["leaderboard", str(part), str(full), "--out", str(tmp_path / "lb")]) == 0
    t = pd.read_csv(tmp_path / "lb" / "leaderboard.csv", keep_default_na=False, na_values=[""])
    sample = t[t["entry"] == "sample-75"].iloc[0]
    assert np.isnan(sample["rank"]) and sample["test_images"] == 75
    assert sample["not_ranked"] == "75 of the split's 25,596 test images"
    official = t[(t["split_family"] == "official") & t["rank"].notna()]
    assert "sample-75" not in set(official["entry"])  # its 0.90 would top the published rows
    assert official["rank"].astype(int).tolist() == list(range(1, len(official) + 1))
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    official_md = _md_section(md, "## Official")
    ranked_md, unranked_md = official_md.split("### Not ranked")
    assert "sample-75" not in ranked_md and "**full**" in ranked_md
    row = next(line for line in unranked_md.splitlines() if "**sample-75**" in line)
    assert "| 75 of the split's 25,596 test images |" in row and "| 75 | 0.900 | [0.890, 0.910] |" in row
    assert "| 25,596 |" in next(line for line in ranked_md.splitlines() if "**full**" in line)
    assert "sample-75" not in set(pd.read_csv(tmp_path / "lb" / "leaderboard_deltas.csv")["run"])


def test_smoke_models_and_unknown_test_list_sizes_are_not_ranked(tmp_path):
    smoke = _run_dir(tmp_path, "s", _aucs(0.95), {"name": "smoke", "split_family": "official", "backbone": "tiny"})
    flagged = _run_dir(tmp_path, "g", _aucs(0.95), {"name": "flag", "split_family": "official", "smoke": True})
    unknown = _run_dir(tmp_path, "u", _aucs(0.95), {"name": "own", "split_family": "random", "test_images_full": None})
    old = _run_dir(tmp_path, "o", _aucs(0.95), {"name": "old", "split_family": "official"})
    metrics = json.loads((old / "metrics.json").read_text())
    del metrics["n_images"]
    (old / "metrics.json").write_text(json.dumps(metrics))
    t = leaderboard_table([read_run(d) for d in (smoke, flagged, unknown, old)], load_baselines()).set_index("entry")
    assert t.loc["smoke", "not_ranked"] == t.loc["flag", "not_ranked"] == "smoke/tiny model"
    assert "full test list size is unknown" in t.loc["own", "not_ranked"]
    assert "not recorded" in t.loc["old", "not_ranked"]
    assert (t.loc[["smoke", "flag", "own", "old"], "rank"] == "").all()


def test_two_evaluations_of_one_run_are_two_entries_and_only_replicates_merge(tmp_path):
    """test/ and eval-tta4/ of one run are not '2 runs': identity comes from run.json."""
    run = {"name": "chexnet-224", "split_family": "official", "px": 224}
    test = _run_dir(tmp_path, "test", _aucs(0.80), {**run, "evaluation": "test"})
    tta = _run_dir(tmp_path, "eval-tta4", _aucs(0.81), {**run, "evaluation": "test, tta 4"})
    t = leaderboard_table([read_run(test), read_run(tta)], load_baselines())
    runs = t[t["kind"] == "run"].set_index("entry")
    assert sorted(runs.index) == ["chexnet-224 (test)", "chexnet-224 (test, tta 4)"]
    assert (runs["n_runs"] == 1).all() and runs["std_runs"].isna().all()
    same_name = [_run_dir(tmp_path, f"copy{i}", _aucs(0.8 + i / 100), run) for i in range(2)]
    runs = leaderboard_table([read_run(d) for d in same_name], load_baselines())
    assert (runs.loc[runs["kind"] == "run", "n_runs"] == 1).all()  # a shared name is no replicate claim
