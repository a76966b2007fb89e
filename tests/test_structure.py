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
from resnext_det.cli.tool import run_tool
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


# ---------------------------------------------------------------------------------------------
# Layers (issue #23): the package's import graph, read from the source (ast), not from the code.
# ---------------------------------------------------------------------------------------------
PKG = os.path.join(ROOT, "resnext_det")
#: Bottom to top, as docs/architecture.md draws them. A file imports only files of lower layers
#: and of its own subpackage (or itself, for a top-level module).
LAYERS = [
    ("leaves", {"errors", "presets", "config", "evaluation", "utils"}),
    ("models and data", {"modeling", "data"}),
    ("weights and the fast path", {"checkpoint", "fast"}),
    ("the training engine", {"engine"}),
    ("inference", {"inference"}),
    ("workflows", {"unshared", "export", "benchmark", "visualize", "plots", "pretrain", "demo"}),
    ("the command line", {"cli"}),
]


def _package_files():
    out = {}
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                mod = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[mod[: -len(".__init__")] if mod.endswith(".__init__") else mod] = path
    return out


def _imports(mod, path, modules):
    """The package modules ``mod`` imports (a package stands for its __init__.py)."""
    import ast

    is_pkg = path.endswith("__init__.py")
    parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else (node.module or "")
            for a in node.names:
                target = f"{base}.{a.name}"
                out.add(target if target in modules else base)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in modules and m != mod}


def _unit(mod):
    """The subpackage or top-level module a package module belongs to ("" for the package)."""
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(mod):
    unit = _unit(mod)
    for i, (_, units) in enumerate(LAYERS):
        if unit in units:
            return i
    raise AssertionError(f"{mod} belongs to no layer of tests/test_structure.py's LAYERS: add it there "
                         "and to docs/architecture.md")


def _rel(mod, modules):
    return os.path.relpath(modules[mod], ROOT)


def test_package_layers_point_one_way():
    """An import from a lower layer to a higher one, or between two subpackages of one layer,
    names both files."""
    modules = _package_files()
    wrong = []
    for mod, path in sorted(modules.items()):
        if mod == "resnext_det":
            continue  # the registration import: test_import_resnext_det_only_registers
        for dep in sorted(_imports(mod, path, modules)):
            if dep == "resnext_det":
                wrong.append(f"{_rel(mod, modules)} imports the package's __init__.py (import the module)")
            elif _unit(dep) != _unit(mod) and _layer(dep) >= _layer(mod):
                wrong.append(f"{_rel(mod, modules)} ({LAYERS[_layer(mod)][0]}) imports {_rel(dep, modules)} "
                             f"({LAYERS[_layer(dep)][0]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_between_files():
    modules = _package_files()
    graph = {m: _imports(m, p, modules) for m, p in modules.items() if m != "resnext_det"}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(_rel(x, modules) for x in stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_import_resnext_det_only_registers():
    """``import resnext_det`` registers backbones, heads, the Appendix B meta-architecture and
    the datasets, as Detectron2's projects do, and loads no training, schedule, export or
    benchmark code."""
    code = (
        "import sys, resnext_det\n"
        "from detectron2.data import DatasetCatalog\n"
        "from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, ROI_HEADS_REGISTRY\n"
        "BACKBONE_REGISTRY.get('build_resnext_fpn_backbone'); ROI_HEADS_REGISTRY.get('ResNeXtRes5ROIHeads')\n"
        "META_ARCH_REGISTRY.get('UnsharedRCNN'); DatasetCatalog.get\n"
        "assert 'shapes_train' in DatasetCatalog.list()\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('resnext_det'))))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = r.stdout.split()
    heavy = ("engine", "unshared", "export", "benchmark", "cli", "inference", "pretrain", "visualize", "demo")
    assert not [m for m in loaded if _unit(m) in heavy], loaded
    assert "resnext_det.modeling.unshared_rcnn" in loaded and "resnext_det.data.shapes" in loaded


def _python_files(*folders):
    for folder in folders:
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in sorted(files):
                if f.endswith(".py"):
                    yield os.path.join(dirpath, f)


def test_private_names_stay_in_their_file():
    """A name with a leading underscore is used only in the file that defines it: what other
    files need is public (and documented), or stays where it is."""
    import ast

    modules = _package_files()
    wrong = []
    for path in _python_files("resnext_det", "tools"):
        tree = ast.parse(open(path).read())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("resnext_det")):
                wrong += [f"{os.path.relpath(path, ROOT)}:{node.lineno} imports {a.name}"
                          for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                for a in node.names:
                    aliases[a.asname or a.name] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and not node.value.id[0].isupper() and node.value.id not in ("self", "cls")):
                # a module of the package imported by name (``from . import convert``)
                if any(m.endswith("." + aliases[node.value.id]) for m in modules):
                    wrong.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} uses "
                                 f"{node.value.id}.{node.attr}")
    assert not wrong, "\n".join(wrong)


def test_files_stay_readable_in_size():
    """Tools parse arguments and call the package (~150 lines); no package file over ~500 lines;
    test files follow the module they test (no file over 1,100 lines)."""
    limits = {"tools": 150, "resnext_det": 500, "tests": 1100}
    wrong = []
    for folder, limit in limits.items():
        for path in _python_files(folder):
            n = sum(1 for _ in open(path))
            if n > limit:
                wrong.append(f"{os.path.relpath(path, ROOT)}: {n} lines (limit {limit})")
    assert not wrong, "\n".join(wrong)


def test_each_concept_is_spelled_once():
    """The res2..res5 stage names, the final checkpoint's file name and the parse of
    ``KEY VALUE`` overrides each have one home in the package."""
    import ast

    found = {"('res2', 'res3', 'res4', 'res5')": [], "'model_final.pth'": [], "[::2]": []}
    for path in _python_files("resnext_det", "tools"):
        src = open(path).read()
        where = os.path.relpath(path, ROOT)
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Tuple) and [getattr(e, "value", None) for e in node.elts] == [
                "res2", "res3", "res4", "res5"
            ]:
                found["('res2', 'res3', 'res4', 'res5')"].append(f"{where}:{node.lineno}")
            elif isinstance(node, ast.Constant) and node.value == "model_final.pth":
                found["'model_final.pth'"].append(f"{where}:{node.lineno}")
            elif (isinstance(node, ast.Slice) and node.lower is None and node.upper is None
                  and isinstance(node.step, ast.Constant) and node.step.value == 2):
                found["[::2]"].append(f"{where}:{node.lineno}")
    wrong = {k: v for k, v in found.items() if len(v) > 1}
    assert not wrong, wrong


def test_architecture_doc_walks_train_net_through_existing_files_once():
    """docs/architecture.md's data path of tools/train_net.py names files that exist, each
    once; its layer drawing names every unit of LAYERS."""
    doc = open(os.path.join(ROOT, "docs", "architecture.md")).read()
    path = doc.split("## The data path", 1)[1].split("\n## ", 1)[0]
    steps = re.findall(r"^\d+\. (.*?)(?=^\d+\. |\Z)", path, re.M | re.S)
    named = []
    for step in steps:
        head = re.findall(r"`((?:resnext_det|tools)/[\w/]+\.py)`", step)
        assert head, step
        folder = os.path.dirname(head[0])
        # "(with `a.py`, `b.py`)" and bare `b.py` after a path: files of the same folder
        named += head + [f"{folder}/{f}" for f in re.findall(r"`(\w+\.py)`", step)]
    assert len(steps) > 20
    assert [f for f in named if not os.path.isfile(os.path.join(ROOT, f))] == []
    assert sorted({f for f in named if named.count(f) > 1}) == []
    drawing = doc.split("```", 2)[1]
    for _, units in LAYERS:
        for unit in units - {"demo"}:
            assert unit in drawing, unit
