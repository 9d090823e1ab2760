"""engine.config: schema defaults, base includes, --opts overrides, unknown keys and type errors."""

from __future__ import annotations

import pickle

import pytest

from engine.cli import build_arg_parser
from engine.config import ENGINE_DEFAULTS, Config, build_schema, load_config, parse_override, save_config

SCHEMA = {
    **ENGINE_DEFAULTS,
    "optimizer": {"lr": 1e-4, "lr_mult": {}, "betas": [0.9, 0.999], "name": "adamw"},
    "data": {"batch_size": 8, "image_res": 256, "train_file": [], "root": None},
}


def write(path, text: str):
    path.write_text(text)
    return path


def test_defaults_and_attribute_access():
    cfg = load_config(None, [], SCHEMA)
    assert cfg.train.epochs == ENGINE_DEFAULTS["train"]["epochs"]
    assert cfg["train"]["grad_accum_steps"] == cfg.train.grad_accum_steps == 1
    assert isinstance(cfg.train, Config)
    cfg.train.epochs = 7
    assert cfg["train"]["epochs"] == 7
    with pytest.raises(AttributeError, match="epochs"):
        _ = cfg.train.epoch
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert type(cfg.to_dict()["train"]) is dict


def test_base_include_and_overrides(tmp_path):
    (tmp_path / "shared").mkdir()
    write(tmp_path / "shared" / "base.yaml", "seed: 3\ntrain:\n  epochs: 4\n  clip_grad_norm: 1\n"
          "data:\n  batch_size: 16\n")
    write(tmp_path / "shared" / "extra.yaml", "base: base.yaml\ndata:\n  image_res: 384\n")
    cfg_file = write(tmp_path / "task.yaml", "base: [shared/extra.yaml]\ntrain:\n  epochs: 5\n")
    cfg = load_config(cfg_file, ["data.batch_size=32", "optimizer.lr=3e-5", "optimizer.lr_mult.visual_encoder=0.1",
                                 "data.train_file=[a.json, b.json]", "train.amp=bf16"], SCHEMA)
    assert cfg.seed == 3  # from the base of the base
    assert cfg.train.epochs == 5  # the including file wins over its base
    assert cfg.train.clip_grad_norm == 1.0 and isinstance(cfg.train.clip_grad_norm, float)  # int accepted for float
    assert cfg.data.image_res == 384
    assert cfg.data.batch_size == 32  # --opts wins over files
    assert cfg.optimizer.lr == pytest.approx(3e-5)
    assert cfg.optimizer.lr_mult == {"visual_encoder": 0.1}  # open dict takes any sub-key
    assert cfg.data.train_file == ["a.json", "b.json"]
    assert cfg.optimizer.betas == [0.9, 0.999]  # untouched defaults stay


def test_unknown_key_names_nearest_and_file(tmp_path):
    cfg_file = write(tmp_path / "bad.yaml", "train:\n  grad_acum_steps: 2\n")
    with pytest.raises(ValueError) as err:
        load_config(cfg_file, [], SCHEMA)
    message = str(err.value)
    assert "train.grad_acum_steps" in message and "train.grad_accum_steps" in message and "bad.yaml" in message
    with pytest.raises(ValueError, match=r"optimizer\.lr"):
        load_config(None, ["optimizer.lrr=1"], SCHEMA)
    with pytest.raises(ValueError, match="--opts"):
        load_config(None, ["trian.epochs=1"], SCHEMA)
    with pytest.raises(ValueError, match="train.epochs"):
        load_config(None, ["trian.epochs=1"], SCHEMA)


def test_type_errors():
    with pytest.raises(ValueError, match="train.epochs.*int.*str"):
        load_config(None, ["train.epochs=many"], SCHEMA)
    with pytest.raises(ValueError, match="bool"):
        load_config(None, ["train.compile=1"], SCHEMA)  # 1 is not a bool
    with pytest.raises(ValueError, match="int"):
        load_config(None, ["train.epochs=1.5"], SCHEMA)
    with pytest.raises(ValueError, match="list"):
        load_config(None, ["data.train_file=a.json"], SCHEMA)
    with pytest.raises(ValueError, match="key.sub=value"):
        load_config(None, ["train.epochs"], SCHEMA)
    cfg = load_config(None, ["data.root=/data", "train.best_metric=val/r_mean", "train.compile=true"], SCHEMA)
    assert cfg.data.root == "/data" and cfg.train.best_metric == "val/r_mean" and cfg.train.compile is True


def test_base_cycle_and_missing_file(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(tmp_path / "a.yaml", [], SCHEMA)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml", [], SCHEMA)


def test_parse_override_yaml_scalars():
    assert parse_override("a=1e-4") == ("a", 1e-4)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a=x=y") == ("a", "x=y")


def test_save_config_round_trip(tmp_path):
    cfg = load_config(None, ["train.epochs=9", "optimizer.lr_mult.text=0.5"], SCHEMA)
    path = save_config(cfg, tmp_path)
    again = load_config(path, [], SCHEMA)
    assert again == cfg


def test_build_schema_has_optimizer_scheduler_and_task_keys():
    schema = build_schema({"data": {"image_res": 256}, "train": {"epochs": 10}})
    assert "lr" in schema["optimizer"] and "warmup_steps" in schema["scheduler"]
    assert schema["train"]["epochs"] == 10 and schema["train"]["grad_accum_steps"] == 1
    assert schema["data"]["image_res"] == 256


def test_arg_parser_flags():
    parser = build_arg_parser()
    args = parser.parse_args(["--evaluate", "--resume", "auto", "--opts", "a=1", "b=2", "--opts", "c=3"])
    assert args.evaluate is True and args.resume == "auto" and args.opts == ["a=1", "b=2", "c=3"]
    assert parser.parse_args([]).evaluate is False


def test_peek_value_reads_bases_then_file_then_overrides(tmp_path):
    from engine.config import peek_value

    (tmp_path / "base.yaml").write_text("model:\n  arch: a\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nseed: 3\n")
    (tmp_path / "own.yaml").write_text("base: base.yaml\nmodel:\n  arch: b\n")
    assert peek_value(tmp_path / "child.yaml", [], "model.arch", "z") == "a"
    assert peek_value(tmp_path / "own.yaml", [], "model.arch", "z") == "b"
    assert peek_value(tmp_path / "own.yaml", ["model.arch=c"], "model.arch", "z") == "c"
    assert peek_value(None, [], "model.arch", "z") == "z"


def test_family_switch_picks_the_class_and_refuses_an_unknown_family(tmp_path):
    from engine.cli import main_for_families
    from tests.toy_task import ToyTask

    class Other(ToyTask):
        pass

    chosen = []

    def fake_run(task_cls, argv):
        chosen.append(task_cls)
        return {}

    import engine.cli as cli

    main = main_for_families("model.arch", {"toy": ToyTask, "other": Other}, default="toy")
    original, cli.run = cli.run, fake_run
    try:
        main([])
        main(["--opts", "model.arch=other"])
        with pytest.raises(ValueError, match="'nope' is not one of"):
            main(["--opts", "model.arch=nope"])
    finally:
        cli.run = original
    assert chosen == [ToyTask, Other]
