"""The package's structure promises (issue #11): one architecture value that validates itself
for every kind of user, one inference model, one way user errors end a tool, logs everywhere."""
import os
import re
import subprocess
import sys

import pytest

from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.layers import FrozenBatchNorm2d

import resnext_det
from resnext_det import add_resnext_config
from resnext_det.engine import setup_cfg
from resnext_det.engine.cli import run_tool
from resnext_det.errors import ConfigError, UserError
from resnext_det.fast import AutocastInference
from resnext_det.inference import build_inference_model
from resnext_det.modeling import ResNeXtSpec, ResNeXtSpecError
from resnext_det.presets import PRESETS, STAGE_BLOCKS, preset_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
TINY = [
    "MODEL.RESNEXT.PRESET", "", "MODEL.RESNEXT.DEPTH", "26", "MODEL.RESNEXT.CARDINALITY", "2",
    "MODEL.RESNEXT.BOTTLENECK_WIDTH", "4", "MODEL.RESNEXT.STEM_OUT_CHANNELS", "8",
    "MODEL.RESNEXT.RES2_OUT_CHANNELS", "16", "MODEL.FPN.OUT_CHANNELS", "16",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "16", "MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.DEVICE", "cpu",
    "MODEL.WEIGHTS", "",
]  # fmt: skip


def _yaml_error(**keys):
    cfg = get_cfg()
    add_resnext_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, "Base-ResNeXt-FPN.yaml"))
    cfg.MODEL.RESNEXT.PRESET = ""
    for k, v in keys.items():
        cfg.MODEL.RESNEXT[k] = v
    with pytest.raises(ResNeXtSpecError) as e:
        ResNeXtSpec.from_config(cfg)
    return str(e.value)


def test_lazyconfig_gets_the_yaml_message_for_a_bad_cardinality():
    """A LazyConfig builds ResNeXtSpec directly: the same check, the same words as the yaml."""
    lazy = LazyConfig.load(os.path.join(CONFIGS, "new_baselines/mask_rcnn_X_50_32x4d_FPN_1x.py"))
    lazy.model.backbone.bottom_up.spec.cardinality = 0
    with pytest.raises(ResNeXtSpecError) as e:
        instantiate(lazy.model.backbone.bottom_up.spec)
    assert str(e.value) == _yaml_error(CARDINALITY=0)
    assert "MODEL.RESNEXT.CARDINALITY = 0" in str(e.value)
    # Python users too, and the error is a ValueError (and one of ours: tools print one line).
    with pytest.raises(ValueError, match="MODEL.RESNEXT.CARDINALITY = 0"):
        ResNeXtSpec(stage_blocks=(3, 4, 6, 3), cardinality=0, bottleneck_width=4)
    assert issubclass(ResNeXtSpecError, UserError)


def test_group_norm_names_the_width_key_that_does_not_split():
    msg = _yaml_error(NORM="GN", RES2_OUT_CHANNELS=100)
    assert "RES2_OUT_CHANNELS" in msg and "32" in msg


def test_presets_and_their_reverse_agree_with_the_paper():
    # Table 1 / the public releases, written out by hand.
    assert ResNeXtSpec.from_preset("X-101-32x8d").stage_blocks == (3, 4, 23, 3)
    assert (ResNeXtSpec.from_preset("X-101-32x8d").cardinality, ResNeXtSpec.from_preset("X-101-32x8d").bottleneck_width) == (32, 8)
    assert ResNeXtSpec.from_preset("R-50").preset == "R-50"  # not the Table 2 alias "1x64d"
    assert ResNeXtSpec.from_preset("8x14d").preset == "8x14d"
    for name in PRESETS:
        spec = ResNeXtSpec.from_preset(name)
        assert ResNeXtSpec.from_preset(spec.preset).same_shapes(spec)
    assert preset_name([2, 2, 2, 2], 32, 4) == ""  # X-26 is no paper model
    assert STAGE_BLOCKS[152] == [3, 8, 36, 3]


def test_config_module_imports_nothing_of_the_package_and_no_import_hides_in_a_function():
    src = open(os.path.join(ROOT, "resnext_det", "config.py")).read()
    assert not re.search(r"^\s*from \.|^\s*import resnext_det", src, re.M)
    offenders = []
    pkg = os.path.join(ROOT, "resnext_det")
    for dirpath, _, files in os.walk(pkg):
        for f in files:
            if f.endswith(".py"):
                for i, line in enumerate(open(os.path.join(dirpath, f)), 1):
                    if re.match(r"^\s+from \.", line):
                        offenders.append(f"{os.path.relpath(os.path.join(dirpath, f), ROOT)}:{i}")
    assert not offenders, offenders


def test_no_sys_path_edits_in_tools_or_tests():
    offenders = []
    for folder in ("tools", "tests"):
        for f in sorted(os.listdir(os.path.join(ROOT, folder))):
            if f.endswith(".py") and f != os.path.basename(__file__):
                if re.search(r"sys\.path\.(insert|append)", open(os.path.join(ROOT, folder, f)).read()):
                    offenders.append(f"{folder}/{f}")
    assert not offenders, offenders


def test_inference_model_applies_the_switches_once():
    cfg = setup_cfg(os.path.join(CONFIGS, "Base-ResNeXt-FPN.yaml"),
                    TINY + ["MODEL.RESNEXT.FOLD_FROZEN_BN", "True", "SOLVER.AMP.ENABLED", "True"])
    model = build_inference_model(cfg, "")
    if resnext_det.fast.amp_dtype(cfg) is not None:  # bf16 where the CPU has it
        assert isinstance(model, AutocastInference)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())  # folded
    assert resnext_det.fast.prepare_for_inference(model, cfg) is model  # preparing again: no-op


def test_run_tool_prints_user_errors_in_one_line_and_keeps_tracebacks_of_bugs(capsys):
    def bad_key():
        raise ConfigError("MODEL.RESNEXT.DEPTH = 7 is not valid")

    assert run_tool(bad_key, "tool.py") == 2
    assert capsys.readouterr().err.strip() == "tool.py: error: MODEL.RESNEXT.DEPTH = 7 is not valid"

    def bug():
        return {}["planted"]  # a KeyError in our code is a bug, not a user error

    with pytest.raises(KeyError, match="planted"):
        run_tool(bug, "tool.py")


@pytest.mark.slow  # subprocesses, several seconds: left out of `make mutants`
def test_train_net_one_line_errors_for_bad_config_files(tmp_path):
    """Empty YAML, a YAML list, malformed YAML, a typo key, an odd number of overrides."""
    cases = {
        "empty.yaml": ("", "is empty"),
        "list.yaml": ("- 1\n- 2\n", "not a mapping"),
        "broken.yaml": ("MODEL: [1, 2\n", "not valid YAML"),
    }
    env = dict(os.environ)
    tool = os.path.join(ROOT, "tools", "train_net.py")
    for name, (text, words) in cases.items():
        (tmp_path / name).write_text(text)
        r = subprocess.run([sys.executable, tool, "--config-file", str(tmp_path / name)],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (name, r.stderr[-2000:])
    base = os.path.join(CONFIGS, "Base-ResNeXt-FPN.yaml")
    for opts, words in ((["MODEL.RESNEXT.CARDINALTY", "4"], "MODEL.RESNEXT.CARDINALTY"),
                        (["MODEL.DEVICE"], "KEY VALUE pairs")):
        r = subprocess.run([sys.executable, tool, "--config-file", base, *opts],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_resnet_keys_beside_a_resnext_backbone_are_named_as_ignored(caplog):
    """MODEL.RESNETS.* and MODEL.BACKBONE.FREEZE_AT do nothing to a ResNeXt backbone: say so."""
    import logging

    with caplog.at_level(logging.WARNING, logger="resnext_det"):
        setup_cfg(os.path.join(CONFIGS, "Base-ResNeXt-FPN.yaml"),
                  ["MODEL.RESNETS.DEPTH", "101", "MODEL.BACKBONE.FREEZE_AT", "0"])
    text = caplog.text
    assert "MODEL.RESNETS.DEPTH" in text and "MODEL.BACKBONE.FREEZE_AT" in text and "ignored" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="resnext_det"):
        setup_cfg(os.path.join(CONFIGS, "Base-ResNeXt-FPN.yaml"), [])
    assert "ignored" not in caplog.text
