"""Study files (parse, check, suggest) and resume checks.
No training here: every test is milliseconds."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from harness.errors import HarnessError
from harness.runs import RunSpec
from harness.store import open_storage
from harness.studies import TuneJob, load_study_file, study_file_for, suggest, trial_spec
from harness.tune import open_study

REPO = Path(__file__).resolve().parents[1]
ICR_ONLY = {"p_mask", "tau", "cl_weight"}

SMALL = """
model = "sasrec"
trials = 3
[fixed]
hidden = 16
[space]
layers = { type = "int", low = 1, high = 2 }
lr = { type = "float", low = 1e-4, high = 1e-2, log = true }
"""


def write(tmp_path: Path, text: str, name: str = "study.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_igr_sr_study_file_is_the_papers_space():
    sf = load_study_file(REPO / "studies" / "igr-sr.toml")
    assert study_file_for("igr-sr").resolve() == (REPO / "studies" / "igr-sr.toml").resolve()
    space = {p.name: p for p in sf.space}
    # ICR is part of the model (Table 2's IGR-SR): fixed on, never searched (w/o ICR is the ablation)
    assert list(space) == ["d_l", "k", "m", "cross_dropout", "p_mask", "tau", "cl_weight", "lr"]
    assert sf.fixed == {"hidden": 64, "use_icr": True} and sf.context["use_icr"] is True
    assert space["d_l"].choices == (8, 16, 32)
    assert (space["k"].type, space["k"].low, space["k"].high) == ("int", 2, 32)
    assert (space["m"].low, space["m"].high) == (1, 5)
    assert (space["p_mask"].low, space["p_mask"].high, space["p_mask"].log) == (0.1, 0.8, False)
    assert (space["tau"].low, space["tau"].high, space["tau"].log) == (0.05, 1.0, True)
    assert (space["lr"].low, space["lr"].high, space["lr"].log) == (1e-4, 1e-2, True)
    assert (space["cl_weight"].low, space["cl_weight"].high, space["cl_weight"].log) == (0.01, 1.0, True)
    assert all(space[n].when == {"use_icr": True} for n in ICR_ONLY)  # still conditional on the fixed value
    assert (sf.metric, sf.direction, sf.sampler[0], sf.pruner[0]) == ("valid_ndcg@10", "maximize", "tpe", "hyperband")
    assert (space["cross_dropout"].low, space["cross_dropout"].high, space["cross_dropout"].log) == (0.0, 0.5, False)
    paper = {"d_l": 32, "k": 8, "m": 3, "p_mask": 0.2, "tau": 0.2, "cl_weight": 0.1, "lr": 1e-3}
    # the paper's defaults first (at the model's default cross_dropout), then the earlier 0.5
    assert sf.enqueue == ({**paper, "cross_dropout": 0.0}, {**paper, "cross_dropout": 0.5})
    assert load_study_file(REPO / "studies" / "sasrec.toml").model == "sasrec"


def test_min_epochs_rescales_the_pruners_first_rung():
    from harness.studies import make_pruner
    sf = load_study_file(REPO / "studies" / "igr-sr.toml")  # hyperband, min_resource 5
    default = make_pruner(sf, None, 200)
    assert (default._min_resource, default._max_resource) == (5, 200)
    capped = make_pruner(sf, None, 6, min_epochs=1)
    assert (capped._min_resource, capped._max_resource) == (1, 6)
    assert make_pruner(sf, None, 3)._min_resource == 3  # never above the cap
    median = make_pruner(sf, "median", 6, min_epochs=2)
    assert median._n_warmup_steps == 2


def test_suggest_on_fixed_trials_drops_conditional_params(tmp_path):
    sf = load_study_file(REPO / "studies" / "igr-sr.toml")
    base = {"d_l": 16, "k": 4, "m": 2, "cross_dropout": 0.1, "lr": 3e-3}
    # the same file with ICR fixed off: the ICR-only parameters are never suggested
    text = (REPO / "studies" / "igr-sr.toml").read_text().replace("use_icr = true\n", "use_icr = false\n", 1)
    off = suggest(optuna.trial.FixedTrial(base), load_study_file(write(tmp_path, text)))
    assert off == base
    on = suggest(optuna.trial.FixedTrial({**base, "p_mask": 0.3, "tau": 0.5, "cl_weight": 0.2}), sf)
    assert set(on) == set(base) | ICR_ONLY
    # lr is a trainer setting, everything else a model parameter
    spec = trial_spec(TuneJob(study_file=sf, dataset="synthetic", base=RunSpec(model="x", dataset="y")), on)
    assert spec.train.lr == 3e-3 and "lr" not in spec.params
    assert spec.params == {"hidden": 64, "d_l": 16, "k": 4, "m": 2, "cross_dropout": 0.1, "use_icr": True,
                           "p_mask": 0.3, "tau": 0.5, "cl_weight": 0.2}
    assert spec.model == "igr-sr" and spec.dataset == "synthetic"


def test_suggest_on_real_trials_stays_inside_the_space():
    sf = load_study_file(REPO / "studies" / "igr-sr.toml")
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(40):
        trial = study.ask()
        params = suggest(trial, sf)
        for p in sf.space:
            if p.name in params:
                assert p.contains(params[p.name]), (p, params[p.name])
        assert "use_icr" not in params and ICR_ONLY <= set(params)  # fixed on: every trial has ICR
        study.tell(trial, 0.0)


K = '[space]\nk = { type = "int", low = 2, high = 32 }\n'  # a valid space to append errors to
BAD = [  # (text after `model = "igr-sr"`, the key the message names, what it says)
    ('color = "red"\n' + K, "color", "unknown key"),
    ('[space.k]\ntype = "int"\nlow = 2\nhigh = 8\nbogus = 1\n', "space.k.bogus", "unknown key"),
    ('[space]\nk = { type = "int", low = 9, high = 2 }\n', "space.k", "low (9) > high (2)"),
    ('[space]\nk = { type = "integer", low = 1, high = 2 }\n', "space.k.type", '"int", "float" or "categorical"'),
    ('[space]\nk = { type = "int", low = "1", high = 2 }\n', "space.k.low", "expected an integer"),
    ('[space]\nk = { type = "int", low = 1.5, high = 2 }\n', "space.k.low", "expected an integer"),
    ('[space]\ntau = { type = "float", low = 0.0, high = 1.0, log = true }\n', "space.tau.low", "log range"),
    ('[space]\nd_l = { type = "categorical", choices = [] }\n', "space.d_l.choices", "non-empty"),
    ('[space]\nd_l = { type = "categorical", choices = [8, "wide"] }\n', "space.d_l.choices", "expected an integer"),
    ('[space]\nk = { type = "float", low = 1, high = 2 }\n', "space.k", 'takes an integer; use type = "int"'),
    ('[space]\nwidth = { type = "int", low = 1, high = 2 }\n', "space.width", "not a parameter of igr-sr"),
    ('[space]\nmax_len = { type = "int", low = 10, high = 50 }\n', "space.max_len", "--max-len"),
    (K + '[fixed]\nhidden = "big"\n', "fixed.hidden", "expected an integer"),
    (K + '[fixed]\nk = 8\n', "space.k", "also in [fixed]"),
    ('[space]\ntau = { type = "float", low = 0.1, high = 1.0, when = { use_icr = true } }\n'
     'use_icr = { type = "categorical", choices = [true, false] }\n', "space.tau.when.use_icr", "must come before"),
    ('[space]\nuse_icr = { type = "categorical", choices = [true] }\n'
     'tau = { type = "float", low = 0.1, high = 1.0, when = { use_icr = false } }\n', "space.tau.when.use_icr",
     "never suggested"),
    ('[space]\ntau = { type = "float", low = 0.1, high = 1.0, when = { colour = 1 } }\n', "space.tau.when.colour",
     "not a parameter"),
    (K + '[[enqueue]]\nk = 99\n', "enqueue[0].k", "outside int [2, 32]"),
    (K + '[[enqueue]]\nwidth = 3\n', "enqueue[0].width", "not in [space]"),
    ('pruner = { name = "median", patience = 3 }\n' + K, "pruner.patience", "not an argument"),
    ('pruner = "asha"\n' + K, "pruner", "hyperband, median, none"),
    ('sampler = { name = "tpe", warmup = 3 }\n' + K, "sampler.warmup", "not an argument of the tpe sampler"),
    ('trials = "many"\n' + K, "trials", "expected an integer"),
    ('metric = "test_ndcg@10"\n' + K, "metric", "valid_ndcg@10"),
    ('trainer = 40\n' + K, "trainer", "expected a table"),
    ('[trainer]\npatience = 0\n' + K, "trainer.patience", "expected a positive integer"),
    ('[trainer]\npatience = true\n' + K, "trainer.patience", "expected a positive integer"),
    ('[trainer]\nepochs = 2.5\n' + K, "trainer.epochs", "expected a positive integer"),
    ('[trainer]\nlr = 0.1\n' + K, "trainer.lr", "[fixed] or [space]"),
    ('[trainer]\nmax_len = 10\n' + K, "trainer.max_len", "not a training-budget setting; known: patience, epochs"),
    # the config's declared ranges (models/*.py RANGES): a fixed value, a searched range, a choice
    (K + '[fixed]\nm = 0\n', "fixed.m = 0", "igr-sr's m must be >= 1"),
    (K + '[fixed]\nfusion = "sum"\n', "fixed.fusion = 'sum'", "igr-sr's fusion must be one of 'cross', 'concat'"),
    ('[space]\nk = { type = "int", low = 0, high = 4 }\n', "space.k", "range [0, 4] is outside igr-sr's k range [1, inf)"),
    ('[space]\nattn_dropout = { type = "float", low = -0.5, high = 0.5 }\n', "space.attn_dropout",
     "range [-0.5, 0.5] is outside igr-sr's attn_dropout range [0, 1)"),
    ('[space]\np_mask = { type = "float", low = 0.5, high = 1.0 }\n', "space.p_mask", "p_mask range [0, 1)"),
    ('[space]\nm = { type = "categorical", choices = [1, 0] }\n', "space.m.choices: 0", "igr-sr's m must be >= 1"),
    ('[space]\nlr = { type = "float", low = 0.0, high = 0.1 }\n', "space.lr", "outside igr-sr's lr range (0, inf)"),
    # and the cross-field ones (hidden split between heads; the LID is d_l wide with the same heads)
    (K + '[fixed]\nheads = 3\n', "igr-sr's hidden (64) must be a multiple of heads (3)", ""),
    (K + '[fixed]\nd_l = 12\nheads = 8\n', "igr-sr's d_l (12) must be a multiple of heads (8)", ""),
]


@pytest.mark.parametrize("snippet, key, message", BAD, ids=[b[1] for b in BAD])
def test_bad_study_files_name_the_file_and_key(tmp_path, snippet, key, message):
    path = write(tmp_path, 'model = "igr-sr"\n' + snippet)
    with pytest.raises(HarnessError) as e:
        load_study_file(path)
    text = str(e.value)
    assert text.startswith(f"{path}: {key}") and message in text, text
    assert "\n" not in text


@pytest.mark.parametrize("text, key, message", [
    ('model = "transformer"\n[space]\nk = { type = "int", low = 1, high = 2 }\n', "model", "unknown model"),
    ('[space]\nk = { type = "int", low = 1, high = 2 }\n', "model", "missing"),
    ('model = "igr-sr/wo-icr"\n[space]\nuse_icr = { type = "categorical", choices = [true, false] }\n',
     "space.use_icr", "igr-sr/wo-icr fixes use_icr"),
    ('model = "igr-sr"\n[space\n', "", "not valid TOML"),
    ('model = "igr-sr"\n', "space", "missing or empty"),
])
def test_bad_model_and_syntax(tmp_path, text, key, message):
    path = write(tmp_path, text)
    with pytest.raises(HarnessError, match=message) as e:
        load_study_file(path)
    assert str(path) in str(e.value) and key in str(e.value)


def test_a_models_declared_ranges_name_the_model_and_field():
    """--param values, [fixed] values and [space] ranges all go through config.check_range."""
    from harness.config import check_range, coerce
    from models.sasrec import SASRecConfig

    with pytest.raises(HarnessError, match=r"^--param attn_dropout=-0.5: sasrec's attn_dropout must be in \[0, 1\)$"):
        coerce(SASRecConfig, {"attn_dropout": "-0.5"})
    with pytest.raises(HarnessError, match=r"^x.toml: space.dropout: range \[0.1, 1.0\] is outside sasrec's dropout"):
        check_range("sasrec", SASRecConfig, "dropout", 0.1, 1.0, where="x.toml: space.dropout")
    assert coerce(SASRecConfig, {"attn_dropout": "0", "layers": "1"}) == {"attn_dropout": 0.0, "layers": 1}
    check_range("sasrec", SASRecConfig, "init_std", 0.0)  # bounds are inclusive unless declared open


def test_every_models_defaults_lie_inside_its_declared_ranges():
    """A range declared once per config field (models/*.py RANGES) holds the model's own defaults
    and names only real fields; every declared range is checked the same way."""
    import dataclasses

    import models
    from harness.config import check_multiples, check_range
    from models.base import declared

    for name in models.names():
        spec = models.get(name)
        config = spec.make_config()
        fields = {f.name for f in dataclasses.fields(spec.config_cls)}
        assert set(declared(spec.config_cls)) <= fields, name
        assert set(declared(spec.config_cls, "MULTIPLE_OF").items()) <= {(a, b) for a in fields for b in fields}, name
        for key in fields:
            check_range(name, spec.config_cls, key, getattr(config, key))
        check_multiples(name, spec.config_cls, dataclasses.asdict(config))


def test_missing_study_file_and_param_clash(tmp_path):
    with pytest.raises(HarnessError, match="does not exist"):
        load_study_file(tmp_path / "nope.toml")
    with pytest.raises(HarnessError, match="no study file for model 'igr-sr/wo-lid'"):
        study_file_for("igr-sr/wo-lid")
    path = write(tmp_path, SMALL)
    assert load_study_file(path, {"inner": "32"}).fixed == {"hidden": 16, "inner": 32}
    with pytest.raises(HarnessError, match="--param layers: .* searches layers"):
        load_study_file(path, {"layers": "1"})
    with pytest.raises(HarnessError, match="--param width"):
        load_study_file(path, {"width": "1"})
    with pytest.raises(HarnessError, match="^--param inner=0: sasrec's inner must be >= 1$"):
        load_study_file(path, {"inner": "0"})


def _job(path: Path, tmp_path: Path, **kw) -> TuneJob:
    return TuneJob(study_file=load_study_file(path), dataset="synthetic", base=RunSpec(model="sasrec", dataset="synthetic"),
                   storage_url=str(tmp_path / "s.journal"), **kw)


def test_changed_search_space_is_refused_unless_new_study(tmp_path):
    path = write(tmp_path, SMALL)
    storage = open_storage(str(tmp_path / "s.journal"))
    study, note = open_study(_job(path, tmp_path), storage)
    assert study.study_name == "sasrec-synthetic" and note.startswith("created study 'sasrec-synthetic'")
    assert study.metric_names == ["valid_ndcg@10"]  # what the dashboard labels the objective
    study.enqueue_trial({"layers": 1, "lr": 1e-3})
    again, note = open_study(_job(path, tmp_path), storage)
    assert again.study_name == "sasrec-synthetic" and note.startswith("resuming study") and "1 waiting" in note

    path.write_text(SMALL.replace("high = 2", "high = 3"))
    journal = (tmp_path / "s.journal").read_bytes()
    with pytest.raises(HarnessError) as e:
        open_study(_job(path, tmp_path), storage)
    assert (tmp_path / "s.journal").read_bytes() == journal  # a refused resume writes nothing
    text = str(e.value)
    assert "different definition" in text and "space.layers: int [1, 2] stored, int [1, 3]" in text
    assert "--new-study" in text and "\n" not in text

    fresh, note = open_study(_job(path, tmp_path, new_study=True), storage)
    assert fresh.study_name == "sasrec-synthetic-2" and "'sasrec-synthetic' is kept" in note
    names = optuna.study.get_all_study_names(storage)
    assert sorted(names) == ["sasrec-synthetic", "sasrec-synthetic-2"]
    assert len(optuna.load_study(study_name="sasrec-synthetic", storage=storage).trials) == 1
    # a different dataset or fixed value is a different definition too
    path.write_text(SMALL.replace("hidden = 16", "hidden = 32"))
    with pytest.raises(HarnessError, match="fixed.hidden: 16 stored, 32"):
        open_study(_job(path, tmp_path, study_name="sasrec-synthetic"), storage)


@pytest.mark.parametrize("path", sorted((REPO / "studies").glob("*.toml")), ids=lambda p: p.stem)
def test_every_enqueued_trial_is_a_trial_the_space_can_suggest(path):
    """An enqueued trial names exactly the parameters its values make active (a conditional
    one, e.g. ReaRec's `inner` at width 256, present iff its `when` holds)."""
    sf = load_study_file(path)
    for params in sf.enqueue:
        study = optuna.create_study(direction="maximize")
        study.enqueue_trial(params)
        assert suggest(study.ask(), sf) == params


@pytest.mark.parametrize("name", ["rearec-erl", "rearec-prl"])
def test_rearec_studies_enqueue_the_codes_width_and_batch(name):
    sf = load_study_file(REPO / "studies" / f"{name}.toml")
    space = {p.name: p for p in sf.space}
    assert space["hidden"].choices == (64, 256) and space["batch_size"].choices[-1] == 2048
    first = sf.enqueue[0]
    assert (first["hidden"], first["batch_size"], first["reason_steps"], first["lr"]) == (64, 256, 2, 1e-3)
    code = [p for p in sf.enqueue if p["hidden"] == 256]
    assert code and all((p["inner"], p["batch_size"], p["dropout"], p["lr"]) == (300, 2048, 0.5, 1e-3) for p in code)
    temperature = space.get("temperature")
    if name == "rearec-prl":  # searched around the code's 0.07; every enqueued trial runs at 0.07
        assert (temperature.low, temperature.high, temperature.log) == (0.05, 5.0, True)
        assert all(p["temperature"] == 0.07 for p in sf.enqueue)
    else:
        assert temperature is None and sf.fixed["temperature"] == 0.07


def test_bert4rec_study_runs_recboles_recipe_then_the_authors():
    sf = load_study_file(REPO / "studies" / "bert4rec.toml")
    recbole, authors = sf.enqueue
    assert recbole == {"layers": 2, "dropout": 0.2, "attn_dropout": 0.2, "mask_ratio": 0.2, "ft_ratio": 0.5,
                       "dupe_factor": 1, "lr": 1e-3}  # first: `--params paper`
    # run_beauty.sh + bert_config_beauty_64.json: masked_lm_prob 0.6, hidden / attention dropout
    # 0.5 / 0.2, lr 1e-4, dupe_factor 10 (one last-item copy per 10: ft_ratio ~ 1/11)
    assert authors == {"layers": 2, "dropout": 0.5, "attn_dropout": 0.2, "mask_ratio": 0.6, "ft_ratio": 0.09,
                       "dupe_factor": 10, "lr": 1e-4}
    assert sf.fixed == {"hidden": 64}


def test_trainer_section_sets_the_models_budget_unless_the_flag_is_given(tmp_path):
    from harness.tune import study_definition

    path = write(tmp_path, SMALL + "[trainer]\npatience = 40\nepochs = 7\n")
    sf = load_study_file(path)
    assert sf.trainer == {"patience": 40, "epochs": 7} and sf.trainer_defaults({"epochs"}) == {"patience": 40}
    job = _job(path, tmp_path)
    assert (job.base.train.patience, job.base.train.epochs) == (40, 7)  # trials, pruner cap, definition
    assert study_definition(job)["train"]["patience"] == 40
    given = _job(path, tmp_path, given_flags=frozenset({"patience"}))  # --patience on the command line wins
    assert (given.base.train.patience, given.base.train.epochs) == (10, 7)
    assert _job(write(tmp_path, SMALL, "plain.toml"), tmp_path).base.train.patience == 10


def test_iclrec_and_icsrec_studies_carry_their_codes_patience():
    for path in sorted((REPO / "studies").glob("*.toml")):
        sf = load_study_file(path)
        expected = {"patience": 40} if sf.model in ("iclrec", "icsrec") else {}
        assert sf.trainer == expected, path.name
