"""Sanity gates on the boards (benchmark.sanity): stored per model, a gate per row, failures marked."""

from __future__ import annotations

import pandas as pd
import torch

from salbench.benchmark import sanity as SN
from salbench.benchmark.harness import score_zoo, zoo_cards
from salbench.model_zoo import zoo
from salbench.model_zoo.architectures import build
from salbench.model_zoo.recipes import get_recipe, is_control_card

from .conftest import FAST, write_zoo_entry


def _add_randlabels_control(env) -> dict:
    """A data-randomisation control card like `salbench train --permute-labels` writes (untrained weights)."""
    torch.manual_seed(5)
    card = write_zoo_entry(env["zoo"], build("lenet").eval(), mid="fmnist-lenet-N-test-randlabels", variant="N")
    card["recipe"] = get_recipe("fmnist", "tiny", "N", permute_labels=True).to_dict()
    zoo.atomic_write_json(env["zoo"] / "cards" / f"{card['id']}.json", card)
    return card


def test_subset_is_declared_and_seeded():
    a, b = SN.subset_indices(1000), SN.subset_indices(1000)  # one seeded draw, same path: equal by design
    assert torch.equal(a, b) and len(a) == SN.SUBSET_N and len(a.unique()) == SN.SUBSET_N
    assert torch.equal(a, a.sort().values) and int(a.max()) < 1000
    assert len(SN.subset_indices(40)) == 40


def test_control_models_stay_off_the_boards(env):
    card = _add_randlabels_control(env)
    assert is_control_card(card) and card["id"] not in {c["id"] for c in zoo_cards("fmnist")}
    assert get_recipe("fmnist", "tiny", "N", permute_labels=True).preset == "tiny-randlabels"


def test_gates_are_stored_boarded_and_reused(env):
    control = _add_randlabels_control(env)
    score_zoo("fmnist", config=FAST, progress=False, imageset=env["imageset"], test_split=env["test"], band=False)
    out = SN.run_sanity("fmnist", config=FAST, progress=False, imageset=env["imageset"], test_split=env["test"])
    assert set(out) == set(env["refs"].values()) | {control["id"]}
    gates = pd.read_csv(env["lb"] / "fmnist_gates.csv")
    curves = pd.read_csv(env["lb"] / "fmnist_sanity.csv")
    main = pd.read_csv(env["lb"] / "fmnist.csv")
    # one gate per model x method (VG, IG and the two controls) plus one data-randomisation row per method
    assert len(gates) == 3 * 4 + 4
    # the model-free controls fail by construction: Spearman 1 with the original after every step, eMPRT 0
    ctl = gates[gates["method"].isin(["random", "edge"]) & gates["sha256"].notna()]
    assert (ctl["mprt_spearman"] == 1).all() and (ctl["emprt"] == 0).all()
    assert all(g.startswith("fail") and "mprt" in g and "emprt" in g for g in ctl["gate"])
    # the cascade has one step per parameterised layer (LeNet: 2 convs + 3 linears; G adds its mixer)
    steps = curves[curves["method"] == "VG"].groupby("id")["step"].max()
    assert steps[env["refs"]["N"]] == 5 and steps[env["refs"]["G"]] == 6
    # the main board carries each row's gate, failures marked and never dropped
    assert len(main) == 6 and main["gate"].notna().all()
    g = gates.set_index(["sha256", "method"])["gate"]
    for _, r in main.iterrows():
        assert r["gate"] == g[(r["sha256"], r["method"])]
    # the gate rule, re-derived from the published values
    for _, r in gates[gates["sha256"].notna()].iterrows():
        fails = [n for n, bad in (("mprt", not r["mprt_spearman"] < SN.MPRT_SPEARMAN_MAX),
                                  ("emprt", not r["emprt"] > SN.EMPRT_MIN),
                                  ("data", r["data_spearman"] >= SN.DATA_SPEARMAN_MAX)) if bad]
        assert r["gate"] == ("pass" if not fails else "fail: " + ", ".join(fails))
    # re-used on the next call
    msgs = []
    SN.run_sanity("fmnist", config=FAST, imageset=env["imageset"], test_split=env["test"], notify=msgs.append)
    assert sum(m.startswith("re-using") for m in msgs) == 3


def test_a_damaged_sanity_file_is_computed_again(env):
    ref = env["refs"]["N"]
    SN.run_sanity("fmnist", config=FAST, progress=False, only=[ref], imageset=env["imageset"], test_split=env["test"])
    (p,) = (env["lb"] / "sanity" / "fmnist").glob("*.json")
    p.write_text("{not json")
    msgs = []
    SN.run_sanity("fmnist", config=FAST, only=[ref], imageset=env["imageset"], test_split=env["test"],
                  notify=msgs.append)
    assert any(m.startswith("sanity checks of") for m in msgs)
    assert SN._read(p) is not None


def test_gate_rule_on_hand_made_documents():
    """The rule of PROTOCOL §9.3 on documents built by hand: thresholds, and an undefined data check
    (a permuted-label model whose maps are constant) reported n/a and left out of the model rows."""
    def doc(mid, sha, sp, emprt):
        return {"model": {"id": mid, "sha256": sha}, "identity": "x", "methods": {
            "VG": {"layers": ["a", "b"], "spearman": [0.9, sp], "ssim": [0.5, 0.2], "smprt_spearman": 0.6,
                   "emprt": emprt}}}

    docs = [doc("ok", "s1", 0.49, 0.01), doc("flat", "s2", 0.5, 0.3), doc("simple", "s3", 0.1, 0.0)]
    gates = SN.sanity_tables(docs + [{"model": {"id": "ctl", "sha256": "c"}, "identity": "y",
                                      "data": {"VG": {"spearman": float("nan"), "ssim": 1.0}}}])["gates"]
    by = dict(zip(gates["id"], gates["gate"]))
    assert by == {"ok": "pass", "flat": "fail: mprt", "simple": "fail: emprt",
                  "ctl": "n/a: the control's maps are constant"}
    gates = SN.sanity_tables(docs + [{"model": {"id": "ctl", "sha256": "c"}, "identity": "y",
                                      "data": {"VG": {"spearman": 0.7, "ssim": 0.4}}}])["gates"]
    assert dict(zip(gates["id"], gates["gate"]))["ok"] == "fail: data"
