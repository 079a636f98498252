"""`spectrt calibrate tree`: cost models (measured curve, roofline), the replay that scores a budget, the
manifest record, and the command's output and errors. The drafting-quality tests check that a calibrated
tree delivers the tau it expected on a model with working heads."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from spectrt.calibration.acceptance import Acceptance, Positions
from spectrt.calibration.trees import candidate_budgets, fit_tree, replay
from spectrt.cli import main
from spectrt.profiles.cost import MeasuredCost, RooflineCost, step_cost
from spectrt.runtime.artifact import ArtifactError, DraftInfo, TreeCalibration, load_artifact, write_manifest
from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.tree import Tree
from tests.tiny_artifact import write_tiny_artifact

ROOT = Path(__file__).resolve().parents[1]
CPU_PROFILE = ROOT / "docs" / "results" / "profile_smollm2_cpu.json"


def curve(ms_by_q: dict, past: int = 0, graphs=("heads", "draft_lm_head")) -> dict:
    """A `spectrt profile --json` result with one verify series and 0.1 ms draft graphs."""
    return {"verify_curve": {"q": list(ms_by_q), "series": [{"past": past, "median_ms": list(ms_by_q.values())}]},
            "points": [{"graph": g, "phase": "frontier", "batch": 1, "median_ms": 0.1} for g in graphs]}


FLAT = curve({1: 10.0, 16: 10.5, 64: 12.0})  # a GPU: 64 nodes cost about one decode step
STEEP = curve({1: 10.0, 2: 11.0, 4: 20.0, 8: 40.0, 16: 80.0, 32: 160.0, 64: 320.0})  # every node costs


# ------------------------------------------------------------------------- cost models

def test_measured_cost_interpolates_the_profile():
    cost = MeasuredCost.load(CPU_PROFILE)
    data = json.loads(CPU_PROFILE.read_text())
    first = data["verify_curve"]["series"][0]
    assert cost.verify_ms(4, first["past"]) == pytest.approx(first["median_ms"][2])
    assert cost.verify_ms(3, first["past"]) == pytest.approx((first["median_ms"][1] + first["median_ms"][2]) / 2)
    assert cost.verify_ms(4, 0) == cost.verify_ms(4, first["past"])  # clamped below the first past
    assert cost.verify_ms(4, 600) > cost.verify_ms(4, 256)  # between two pasts
    assert cost.verify_ms(80, 256) > cost.verify_ms(64, 256)  # beyond the curve: extended, never flat
    assert cost.max_q == 64
    assert 0 < cost.graph_ms("heads", 1) < cost.graph_ms("heads", 8) < cost.graph_ms("heads", 16)


def test_bad_timings_are_one_line_errors(tmp_path):
    bad = tmp_path / "t.json"
    with pytest.raises(SpectrtError, match="no such timings file"):
        MeasuredCost.load(tmp_path / "missing.json")
    bad.write_text("{not json")
    with pytest.raises(SpectrtError, match="cannot read the timings JSON"):
        MeasuredCost.load(bad)
    bad.write_text('{"points": []}')
    with pytest.raises(SpectrtError, match="not the JSON of `spectrt profile --json`"):
        MeasuredCost.load(bad)
    bad.write_text(json.dumps(curve({1: 5.0}, graphs=())))
    with pytest.raises(SpectrtError, match="no timings of graph.* heads"):
        MeasuredCost.load(bad).check_graphs(["base", "heads", "draft_lm_head"])


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """A tiny artifact without draft heads."""
    return load_artifact(write_tiny_artifact(tmp_path_factory.mktemp("bare") / "art", graphs=("base",)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Medusa artifact (numpy-built graphs: 3 heads, top-4)."""
    from tests.tiny_artifact import TINY_DIMS

    root = write_tiny_artifact(tmp_path_factory.mktemp("tiny") / "art")
    art = load_artifact(root)
    draft = DraftInfo(kind="medusa", num_heads=TINY_DIMS["heads"], num_layers=1, topk=TINY_DIMS["topk"],
                      shared_lm_head=True, source="tiny", tree=((0,),), lm_head_rows=TINY_DIMS["vocab"])
    write_manifest(root, dataclasses.replace(art.manifest, draft=draft))
    return load_artifact(root)


def test_roofline_is_memory_bound_then_compute_bound(tiny):
    cost = RooflineCost(tiny, "orin-nano-8gb")
    assert cost.max_q == 32 and cost.kind == "roofline"
    ms = [cost.verify_ms(q, 100) for q in (1, 2, 4, 8, 16, 32)]
    assert ms == sorted(ms) and ms[-1] > ms[0]
    assert cost.verify_ms(1, 1000) > cost.verify_ms(1, 10)  # the KV cache is read too
    assert cost.graph_ms("heads", 16) >= cost.graph_ms("heads", 1) > 0
    big = dataclasses.replace(tiny.manifest.model, hidden=2048, intermediate=8192, num_layers=24, head_dim=128,
                              num_heads=16, kv_heads=16, vocab=32000)
    art = dataclasses.replace(tiny, manifest=dataclasses.replace(tiny.manifest, model=big))
    sized = RooflineCost(art, "orin-nano-8gb")  # a 1B-class model on 68 GB/s: ~10-100 ms a step, flat in q
    assert 5 < sized.verify_ms(1, 256) < 100
    assert sized.verify_ms(8, 256) < 1.2 * sized.verify_ms(1, 256)


def test_roofline_needs_bandwidth_and_peak(tiny, tmp_path):
    custom = tmp_path / "board.yaml"
    custom.write_text("base: orin-nano-8gb\nname: board\n")
    assert RooflineCost(tiny, str(custom)).bandwidth > 0  # inherited
    from spectrt.profiles.device import PROFILE_DIR

    text = (PROFILE_DIR / "orin-nano-8gb.yaml").read_text()
    bare = "\n".join(line for line in text.splitlines() if not line.startswith(("memory_bandwidth", "peak_fp16")))
    custom.write_text(bare)
    with pytest.raises(SpectrtError, match="no memory_bandwidth_gbs/peak_fp16_tflops"):
        RooflineCost(tiny, str(custom))
    with pytest.raises(SpectrtError, match="unknown device profile 'no-such-board'"):
        RooflineCost(tiny, "no-such-board")
    with pytest.raises(SpectrtError, match="pass one"):
        step_cost(tiny, timings="t.json", profile="orin-nano-8gb")


# ------------------------------------------------------------------------- the replay

def positions(ranks, chain=None, hits=None, chain_ranks=None) -> Positions:
    ranks = np.array(ranks, np.int64)
    n, k = ranks.shape
    z = np.zeros(n, np.int64)
    return Positions(ranks, z if chain is None else np.array(chain), z if hits is None else np.array(hits),
                     np.full((n, k), -1) if chain_ranks is None else np.array(chain_ranks), np.full(n, 100))


def test_replay_accepts_the_longest_tree_path_and_skips_ahead():
    # step 0 accepts ranks (0, 1) -> 3 tokens, so the next step is row 3 (accepts 1 -> 2 tokens), then row 5
    s = positions([[0, 1, 5], [0, 0, 0], [0, 0, 0], [1, -1, 0], [0, 0, 0], [-1, 0, 0]])
    acc = Acceptance("medusa", 3, 10, (s,))
    tree = Tree.from_paths([[0], [1], [0, 1]])
    tau, q, ms = replay(acc, tree, "heads", MeasuredCost(FLAT, "flat"), lambda *_: 1.0)
    assert (tau, q) == (pytest.approx(6 / 3), 4)
    # both accepting steps went through a rank-1 node (not the first slots): their heads' rows (2, then 1) are
    # verified again ahead of the next draft, a call that many rows bigger
    c = MeasuredCost(FLAT, "flat").verify_ms
    assert ms == pytest.approx(c(4, 100) + 1.0 + (c(6, 100) - c(4, 100) + c(5, 100) - c(4, 100)) / 3)


def test_replay_charges_a_recheck_off_the_first_slots():
    cost, tree = MeasuredCost(FLAT, "flat"), Tree.from_paths([[0], [1], [0, 0]])
    for ranks, chain, hits, got, again in (
            ([0, 0, -1], 0, 0, 2, 0),  # the heads' rank-0 path: slots 1, 2
            ([1, -1, -1], 0, 0, 1, 1),  # rank 1 sits after the [0] subtree
            ([0, 0, -1], 2, 0, 2, 2),  # a wrong chain holds slots 1-2: the heads' nodes come after it
            ([0, 0, -1], 1, 1, 2, 0),  # a right 1-token chain is the heads' [0]; [0, 0] follows it
            ([0, -1, -1], 3, 1, 1, 0)):  # the chain accepts as much as the heads do
        s = positions([ranks], chain=[chain], hits=[hits], chain_ranks=[[0, 0, -1] if hits else [-1, -1, -1]])
        tau, q, ms = replay(Acceptance("medusa", 3, 10, (s,)), tree, "heads+lookup", cost, lambda *_: 0.0)
        assert tau == got + 1
        assert ms == pytest.approx(cost.verify_ms(q + again, 100))  # rows verified again ride on the next call


def test_replay_merges_the_lookup_chain():
    # the chain (3 tokens, 2 right) beats the heads (1 right); 2 heads nodes ([0], [0, 0]) merge with it
    s = positions([[0, -1, 0]], chain=[3], hits=[2], chain_ranks=[[0, 0, 3]])
    acc = Acceptance("medusa", 3, 10, (s,))
    tree = Tree.from_paths([[0], [1], [0, 0]])
    tau, q, _ = replay(acc, tree, "heads+lookup", MeasuredCost(FLAT, "flat"), lambda *_: 0.0)
    assert tau == 3 and q == 4 + 3 - 2


def synthetic(right: float, n: int = 400, heads: int = 3, seed: int = 0) -> Acceptance:
    """Heads that are right at rank 0 with probability ``right``, else at rank 1 half the time."""
    rng = np.random.default_rng(seed)
    u = rng.random((n, heads))
    ranks = np.where(u < right, 0, np.where(u < right + (1 - right) / 2, 1, -1))
    return Acceptance("medusa", heads, 4, (positions(ranks),))


def test_fit_tree_follows_the_cost_curve(tiny):
    good = synthetic(0.8)
    flat = fit_tree(tiny, good, MeasuredCost(FLAT, "flat"), draft="heads")
    steep = fit_tree(tiny, good, MeasuredCost(STEEP, "steep"), draft="heads")
    assert flat.best.nodes > 8 and flat.tree.max_depth == 3 and flat.best.tau > 2.5
    assert steep.best.nodes == 2 and steep.tree.paths == ((0,),)
    assert [r.nodes for r in flat.rows] == candidate_budgets(64)
    assert flat.rows[0].nodes == 1 and flat.rows[0].tau == 1.0 and flat.rows[0].speedup == pytest.approx(1.0)
    assert flat.accuracy[0][0] == pytest.approx(0.8, abs=0.05)
    assert fit_tree(tiny, good, MeasuredCost(FLAT, "flat"), draft="heads", max_nodes=5).best.nodes <= 5
    with pytest.raises(SpectrtError, match="calibrated for --draft heads or heads\\+lookup"):
        fit_tree(tiny, good, MeasuredCost(FLAT, "flat"), draft="lookup")
    roof = fit_tree(tiny, good, RooflineCost(tiny, "orin-nano-8gb"), draft="heads+lookup")
    assert max(r.nodes for r in roof.rows) <= 32 - 4  # the profile's verify rows, less the lookup chain


# ------------------------------------------------------------------------- the manifest record

def test_manifest_records_and_checks_the_budget(medusa_export, tmp_path):
    out = shutil.copytree(medusa_export, tmp_path / "art")
    art = load_artifact(out)
    cal = TreeCalibration("measured", "t.json", "heads", "2 prompts", 10, 1.5, 30.0, 1.2)
    tree = Tree.from_paths([[0], [1], [0, 0]])
    write_manifest(out, dataclasses.replace(art.manifest, draft=dataclasses.replace(
        art.draft, tree=tree.paths, nodes=4, calibration=cal)))
    draft = load_artifact(out).draft
    assert draft.nodes == 4 and draft.node_budget == 4 and draft.calibration == cal
    data = json.loads((out / "manifest.json").read_text())
    for edit, message in [(dict(nodes=3), "draft.nodes: the static tree has 4 nodes, over the budget of 3"),
                          (dict(nodes=None), "draft.calibration: records a calibrated node budget"),
                          (dict(calibration={**data["draft"]["calibration"], "cost": "guess"}),
                           "draft.calibration.cost: 'guess' is not one of measured, roofline"),
                          (dict(calibration={**data["draft"]["calibration"], "tau": 0.5}), "tau: tokens per step")]:
        (out / "manifest.json").write_text(json.dumps({**data, "draft": {**data["draft"], **edit}}))
        with pytest.raises(ArtifactError, match=message):
            load_artifact(out)


# ------------------------------------------------------------------------- the command

@pytest.fixture
def prompts(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "the quick brown fox"}\n{"prompt": "hello world, hello"}\n{"prompt": "a b c"}\n')
    return f


def test_calibrate_tree_writes_the_choice_generate_uses(medusa_export, tmp_path, prompts, capsys):
    from spectrt.runtime.session import SessionConfig, SpecSession

    out = shutil.copytree(medusa_export, tmp_path / "art")
    timings = tmp_path / "t.json"
    timings.write_text(json.dumps(FLAT))
    before = (out / "manifest.json").read_text()
    argv = ["calibrate", "tree", str(out), "--timings", str(timings), "--prompts", str(prompts), "--limit", "2",
            "-n", "24", "--max-nodes", "12", "--json", str(tmp_path / "choice.json")]
    assert main(argv + ["--dry-run"]) == 0
    assert (out / "manifest.json").read_text() == before
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "acceptance by rank" in text and "tok/s" in text and "<- chosen" in text and "written to" in text
    choice = json.loads((tmp_path / "choice.json").read_text())
    draft = load_artifact(out).draft
    assert draft.nodes == choice["nodes"] == len(draft.tree) + 1 <= 12
    assert [list(p) for p in draft.tree] == choice["tree"]
    cal = draft.calibration
    assert (cal.cost, cal.cost_source, cal.draft, cal.prompts) == ("measured", str(timings), "heads+lookup",
                                                                    f"2 prompts of {prompts}")
    with SpecSession(out, SessionConfig(draft="heads")) as s:
        assert s.tree.paths == tuple(tuple(p) for p in choice["tree"])


def test_calibrate_tree_with_a_roofline(medusa_export, tmp_path, prompts, capsys):
    out = shutil.copytree(medusa_export, tmp_path / "art")
    assert main(["calibrate", "tree", str(out), "--profile", "orin-nano-8gb", "--prompts", str(prompts),
                 "-n", "24", "--draft", "heads"]) == 0
    assert "roofline (orin-nano-8gb)" in capsys.readouterr().out
    cal = load_artifact(out).draft.calibration
    assert (cal.cost, cal.profile, cal.draft) == ("roofline", "orin-nano-8gb", "heads")


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spectrt calibrate tree: error: "), err
    return err


def test_calibrate_tree_errors(capsys, tmp_path, bare, medusa_export):
    assert "not a directory" in _error(capsys, ["calibrate", "tree", str(tmp_path / "missing"), "--profile", "rtx-4090"])
    assert "no draft heads in this export" in _error(capsys, ["calibrate", "tree", str(bare.root),
                                                              "--profile", "rtx-4090"])
    assert "pass one" in _error(capsys, ["calibrate", "tree", str(bare.root), "--timings", "t.json",
                                         "--profile", "rtx-4090"])
    assert "unknown device profile 'nope'" in _error(capsys, ["calibrate", "tree", str(medusa_export),
                                                              "--profile", "nope"])
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert "not the JSON of `spectrt profile --json`" in _error(capsys, ["calibrate", "tree", str(medusa_export),
                                                                         "--timings", str(bad)])
    assert "'lookup' is not one of" in _error(capsys, ["calibrate", "tree", str(medusa_export), "--draft", "lookup"])
