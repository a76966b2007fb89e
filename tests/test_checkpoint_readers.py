"""Tests of resnext_det/checkpoint/readers.py: weight files of every container (zip, pickle,
safetensors, Torch7) read without running code, the usual wrappers unwrapped, and every
unreadable file (truncated, empty, random bytes, a web page, a pickle that would run code)
refused in one line naming the file and what is wrong, whether loaded through MODEL.WEIGHTS
or converted."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from detectron2.modeling import build_model

from resnext_det.checkpoint import ResNeXtCheckpointer, WeightsConfigError, config_pairs, convert_weights
from resnext_det.checkpoint.readers import CheckpointReadError
from resnext_det.unshared.proposals import load_proposal_file

from reliability_helpers import CONFIG, ROOT, TINY, _tiny_model
from weights_helpers import detector_cfg, run_tool


# --------------------------------------------------------------------------
# Containers and wrappers, read as torch.load and pickle give them
# --------------------------------------------------------------------------
@pytest.mark.usefixtures("one_thread")
def test_containers_are_sniffed_from_their_first_bytes(tmp_path):
    """Hand-made starts of each format; anything else (an HTML page, a byte that only looks
    like a pickle protocol in second place, a 1-byte file) is "unknown"."""
    from resnext_det.checkpoint.readers import sniff_container

    cases = {
        "zip": b"PK\x03\x04" + b"\0" * 30,
        "pickle": b"\x80\x02}q\x00.",
        "safetensors": (2).to_bytes(8, "little") + b"{}",  # header length, then the JSON header
        "t7": np.array([4, 1], "<i4").tobytes() + b"\0" * 8,
        "unknown": b"<html>404</html>",
    }
    for want, data in cases.items():
        (tmp_path / want).write_bytes(data)
        assert sniff_container(str(tmp_path / want)) == want, want
    # The edges: an empty zip archive, pickle protocols 2..5 (a 2-byte start too), the shortest
    # safetensors file (1-byte header), an 8-byte Torch7 start.
    edges = {b"PK\x05\x06" + b"\0" * 18: "zip", b"\x80\x02": "pickle", b"\x80\x05\x95": "pickle",
             b"\x80\x06\x95": "unknown", (1).to_bytes(8, "little") + b"{": "safetensors",
             (2).to_bytes(8, "little") + b"{": "unknown", np.array([3, 1], "<i4").tobytes(): "t7",
             np.array([3, 2], "<i4").tobytes(): "unknown", np.array([7, 1], "<i4").tobytes(): "unknown"}
    for data, want in edges.items():
        (tmp_path / "x").write_bytes(data)
        assert sniff_container(str(tmp_path / "x")) == want, data
    for data in (b"<\x02html not a pickle", b"A\x05", b"\x02", b"\x80"):
        (tmp_path / "x").write_bytes(data)
        assert sniff_container(str(tmp_path / "x")) == "unknown", data


@pytest.mark.usefixtures("one_thread")
def test_read_weights_file_reads_each_container_and_trusts_only_when_told(tmp_path):
    """A zip (torch.save), a Caffe2 pickle, safetensors: the same tensors, the container
    named, DataParallel's module. prefix dropped and the entries next to the weights kept.
    A file with another Python object (a date) reads with trust_pickle=True only."""
    import datetime

    from safetensors.torch import save_file

    from resnext_det.checkpoint.readers import read_weights_file

    sd = {"conv1.weight": torch.arange(6.0).reshape(2, 3), "fc.bias": torch.ones(2)}
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "arch": "x"}, tmp_path / "a.pth")
    with open(tmp_path / "b.pkl", "wb") as f:
        pickle.dump({"blobs": {k: v.numpy() for k, v in sd.items()}, "__author__": "c2"}, f, protocol=2)
    save_file(sd, str(tmp_path / "c.safetensors"))
    for name, container, extra in (("a.pth", "zip", {"arch": "x"}), ("b.pkl", "pickle", {"__author__": "c2"}),
                                   ("c.safetensors", "safetensors", {})):
        got = read_weights_file(str(tmp_path / name))
        assert (got.path, got.container, got.extra) == (str(tmp_path / name), container, extra), name
        assert got.tensors.keys() == sd.keys() and all(torch.equal(got.tensors[k], v) for k, v in sd.items()), name
    when = datetime.date(2017, 4, 11)
    torch.save({"state_dict": sd, "date": when}, tmp_path / "d.pth")
    with open(tmp_path / "e.pkl", "wb") as f:
        pickle.dump({"blobs": {k: v.numpy() for k, v in sd.items()}, "date": when}, f, protocol=2)
    for name in ("d.pth", "e.pkl"):
        with pytest.raises(CheckpointReadError):
            read_weights_file(str(tmp_path / name))
        got = read_weights_file(str(tmp_path / name), trust_pickle=True)
        assert got.extra == {"date": when} and got.tensors.keys() == sd.keys(), name


def test_legacy_torch_files_and_wrapped_state_dicts_read_as_torch_loads_them(tmp_path):
    """A pre-1.6 torch.save file (not a zip; torch's magic number first) and the usual
    wrappers ("state_dict", "model", "model_state", DataParallel's "module") read as
    torch.load gives them, without running code."""
    from resnext_det.checkpoint.readers import read_weights_file

    sd = {"conv1.weight": torch.arange(6.0).reshape(2, 3), "fc.bias": torch.ones(2)}
    legacy = tmp_path / "legacy.pth"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    got = read_weights_file(str(legacy)).tensors
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    for key in ("state_dict", "model", "model_state", "module"):
        torch.save({key: sd, "epoch": 3}, tmp_path / f"{key}.pth")
        got = read_weights_file(str(tmp_path / f"{key}.pth")).tensors
        assert set(got) == set(sd), key


@pytest.mark.usefixtures("one_thread")
def test_a_wrapper_entry_that_is_not_a_dict_is_skipped(tmp_path):
    """{"model": "resnext50_32x4d", "model_state": {...}} (a name next to the weights): the
    weights are model_state's, the name an extra entry."""
    from resnext_det.checkpoint.readers import read_weights_file

    sd = {"conv1.weight": torch.ones(2, 3), "fc.bias": torch.zeros(2)}
    torch.save({"model": "resnext50_32x4d", "model_state": sd, "epoch": 3}, tmp_path / "w.pth")
    got = read_weights_file(str(tmp_path / "w.pth"))
    assert got.tensors.keys() == sd.keys() and got.extra == {"model": "resnext50_32x4d", "epoch": 3}


@pytest.mark.usefixtures("one_thread")
def test_weights_are_found_inside_each_usual_wrapper_and_ema_only_when_asked():
    """timm's EMA entries only with --use-ema (and then first); otherwise state_dict, model,
    model_state, blobs (Caffe2), module (DataParallel), else the dict itself; --use-ema on a
    file without EMA weights, or a file that is not a dict, is an error naming the file."""
    from resnext_det.checkpoint.readers import _unwrap

    w, ema = {"a": 1}, {"a": 2}
    for key in ("state_dict", "model", "model_state", "blobs", "module"):
        assert _unwrap({key: w, "epoch": 3}, "f.pth", use_ema=False) is w, key
        assert _unwrap({key: w, "state_dict_ema": ema}, "f.pth", use_ema=False) is w, key
    for key in ("state_dict_ema", "model_ema"):
        assert _unwrap({"state_dict": w, key: ema}, "f.pth", use_ema=True) is ema, key
    assert _unwrap({"model": w, "state_dict": ema}, "f.pth", use_ema=False) is ema  # state_dict first
    assert _unwrap({"model_state": w, "blobs": ema}, "f.pth", use_ema=False) is w
    flat = {"conv1.weight": 0}
    assert _unwrap(flat, "f.pth", use_ema=False) is flat
    with pytest.raises(CheckpointReadError, match=r"--use-ema: 'f.pth' has no EMA weights \(no 'state_dict_ema'"):
        _unwrap(flat, "f.pth", use_ema=True)
    with pytest.raises(CheckpointReadError, match=r"'f.pth' holds a list, not a dict"):
        _unwrap([w], "f.pth", use_ema=False)


@pytest.mark.usefixtures("one_thread")
def test_use_ema_on_a_checkpoint_without_ema_weights_is_refused():
    """--use-ema asks for timm's EMA weights: a checkpoint holding only "state_dict" must be
    refused (as a bare state dict is), not converted from its non-EMA weights."""
    from resnext_det.checkpoint.readers import _unwrap

    with pytest.raises(CheckpointReadError) as e:
        _unwrap({"state_dict": {"a": 1}, "epoch": 3}, "f.pth", use_ema=True)
    msg = str(e.value)
    assert "'state_dict_ema'" in msg and "'state_dict', 'epoch'" in msg and "leave out --use-ema" in msg


@pytest.mark.usefixtures("one_thread")
def test_python2_pickles_read_their_byte_strings_as_latin1(tmp_path):
    """Detectron (Python 2) .pkl files hold byte strings: read as latin-1, as Detectron2's
    own checkpointer reads them (pickle.load(f, encoding="latin1"))."""
    from detectron2.checkpoint import DetectionCheckpointer

    from resnext_det.checkpoint.readers import read_weights_file, safe_pickle_load

    # protocol 2, {b"caf\xe9": 1, "__author__": b"Detectron", "model": {b"conv1_w": <ndarray>}}
    arr = pickle.dumps(np.arange(3, dtype=np.float32), protocol=2)[2:-1]  # the array, no header / STOP
    data = (b"\x80\x02}(U\x04caf\xe9K\x01U\n__author__U\tDetectronU\x05model}U\x07conv1_w" + arr + b"su.")
    path = tmp_path / "py2.pkl"
    path.write_bytes(data)
    ref = pickle.loads(data, encoding="latin1")
    assert ref["caf\xe9"] == 1  # what latin-1 gives, by hand
    got = safe_pickle_load(str(path))
    assert got.keys() == ref.keys() and np.array_equal(got["model"]["conv1_w"], np.arange(3, dtype=np.float32))
    ours = ResNeXtCheckpointer(torch.nn.Linear(1, 1))._load_file(str(path))
    theirs = DetectionCheckpointer(torch.nn.Linear(1, 1))._load_file(str(path))
    assert ours.keys() == theirs.keys() and ours["model"].keys() == theirs["model"].keys()
    assert read_weights_file(str(path)).tensors.keys() == {"conv1_w"}


@pytest.mark.usefixtures("one_thread")
def test_python2_pickles_read_as_latin1_when_trusted_too(tmp_path, monkeypatch):
    """RESNEXT_DET_TRUST_PICKLE=1 (and trust_pickle=True) read a Detectron (Python 2) .pkl as
    the safe path does: its byte strings as latin-1 (pickle's default, ASCII, fails on them)."""
    from resnext_det.checkpoint.readers import read_weights_file, safe_pickle_load

    arr = pickle.dumps(np.arange(3, dtype=np.float32), protocol=2)[2:-1]
    data = (b"\x80\x02}(U\x04caf\xe9K\x01U\n__author__U\tDetectronU\x05model}U\x07conv1_w" + arr + b"su.")
    path = tmp_path / "py2.pkl"
    path.write_bytes(data)
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(data)  # the default encoding cannot read them
    monkeypatch.setenv("RESNEXT_DET_TRUST_PICKLE", "1")
    got = safe_pickle_load(str(path))
    assert got["caf\xe9"] == 1 and got["__author__"] == "Detectron"
    assert np.array_equal(got["model"]["conv1_w"], np.arange(3, dtype=np.float32))
    w = read_weights_file(str(path), trust_pickle=True)
    assert w.tensors.keys() == {"conv1_w"} and w.extra["caf\xe9"] == 1


# --------------------------------------------------------------------------
# Pickles that would run code: refused, unless the user trusts them
# --------------------------------------------------------------------------
class _Evil:
    """A pickle that runs a shell command when loaded (what a hostile .pkl does)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_pickle(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"model": {"x": np.zeros(1, np.float32)}, "__author__": "x", "y": _Evil(marker)}, f)


@pytest.mark.usefixtures("one_thread")
def test_a_weights_pickle_never_runs_its_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    _evil_pickle(evil, marker)
    cfg, model = _tiny_model(tmp_path)
    with pytest.raises(CheckpointReadError, match="refused to unpickle.*RESNEXT_DET_TRUST_PICKLE"):
        ResNeXtCheckpointer(model, cfg=cfg).load(str(evil))
    assert not marker.exists()
    # ... nor through a .pth (torch.save of an object that runs code when loaded).
    evil_pth = tmp_path / "evil.pth"
    torch.save({"model": {}, "y": _Evil(marker)}, evil_pth)
    with pytest.raises(CheckpointReadError, match="RESNEXT_DET_TRUST_PICKLE"):
        ResNeXtCheckpointer(model, cfg=cfg).load(str(evil_pth))
    assert not marker.exists()
    # ... nor a proposal file.
    with pytest.raises(CheckpointReadError, match="refused"):
        load_proposal_file(str(evil))
    assert not marker.exists()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.slow  # subprocesses, several seconds: left out of `make mutants`
def test_train_net_refuses_a_code_running_pickle_in_one_line(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    _evil_pickle(evil, marker)
    for extra in ([], ["--eval-only"]):
        r = subprocess.run(
            [sys.executable, os.path.join(ROOT, "tools/train_net.py"), "--config-file", CONFIG, *extra,
             *TINY, "MODEL.WEIGHTS", str(evil), "OUTPUT_DIR", str(tmp_path / "o")],
            capture_output=True, text=True, timeout=600, cwd=ROOT,
        )
        assert r.returncode == 2, r.stderr[-3000:]
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("train_net.py: error:") and "refused to unpickle" in last, last
        assert "Traceback" not in r.stderr
        assert not marker.exists()


@pytest.mark.usefixtures("one_thread")
def test_trusting_a_pickle_is_the_users_explicit_choice(tmp_path, monkeypatch):
    """RESNEXT_DET_TRUST_PICKLE=1, and only "1", lets a pickle that runs code load (here a
    harmless `touch`), through a .pkl and a .pth alike."""
    from resnext_det.checkpoint.readers import safe_pickle_load, torch_load_weights

    marker = tmp_path / "ran"
    _evil_pickle(tmp_path / "evil.pkl", marker)
    torch.save({"model": {}, "y": _Evil(marker)}, tmp_path / "evil.pth")
    for value in ("0", "true"):
        monkeypatch.setenv("RESNEXT_DET_TRUST_PICKLE", value)
        for load in (safe_pickle_load, torch_load_weights):
            with pytest.raises(CheckpointReadError):
                load(str(tmp_path / ("evil.pkl" if load is safe_pickle_load else "evil.pth")))
    assert not marker.exists()
    monkeypatch.setenv("RESNEXT_DET_TRUST_PICKLE", "1")
    assert "model" in safe_pickle_load(str(tmp_path / "evil.pkl")) and marker.exists()
    marker.unlink()
    assert "model" in torch_load_weights(str(tmp_path / "evil.pth")) and marker.exists()


def _global_pickle(module, name, protocol=2):
    """A pickle that asks for the class module.name (GLOBAL / STACK_GLOBAL opcode), as a
    hostile file does before it calls it."""
    if protocol >= 4:
        m, n = module.encode(), name.encode()
        return b"\x80\x04\x8c" + bytes([len(m)]) + m + b"\x8c" + bytes([len(n)]) + n + b"\x93."
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n."


@pytest.mark.usefixtures("one_thread")
def test_the_safe_unpickler_refuses_every_class_outside_its_list(tmp_path):
    """Only numpy arrays and plain containers: names differing by case, a dotted name under
    an allowed module (protocol 4 resolves it), or a lookalike module are refused without
    being imported; the allowed ones load."""
    import collections

    from resnext_det.checkpoint.readers import safe_pickle_load

    refused = [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("builtins", "getattr"),
               ("numpy", "NDARRAY"), ("Numpy", "ndarray"), ("numpy", "load"), ("numpy.core.multiarray", "Scalar"),
               ("numpy", "core.multiarray._reconstruct"), ("numpy.core.multiarray ", "_reconstruct"),
               ("collections", "OrderedDict.__init__"), ("_codecs", "decode"), ("builtins", "Set"),
               ("detectron2.structures.boxes", "Boxes"), ("subprocess", "Popen")]  # fmt: skip
    for i, (module, name) in enumerate(refused):
        for protocol in (2, 4):
            path = tmp_path / f"g{i}_{protocol}.pkl"
            path.write_bytes(_global_pickle(module, name, protocol))
            with pytest.raises(CheckpointReadError) as e:
                safe_pickle_load(str(path))
            assert f"{module}.{name}" in str(e.value) and repr(str(path)) in str(e.value)
    for module, name, want in [("collections", "OrderedDict", collections.OrderedDict), ("builtins", "set", set),
                               ("builtins", "frozenset", frozenset), ("numpy", "ndarray", np.ndarray)]:
        path = tmp_path / "ok.pkl"
        path.write_bytes(_global_pickle(module, name))
        assert safe_pickle_load(str(path)) is want


@pytest.mark.usefixtures("one_thread")
def test_a_refused_pickle_names_the_class_the_file_and_the_opt_in(tmp_path):
    """Loading (MODEL.WEIGHTS) and converting (read_weights_file) a pickle that would run
    code: refused naming what it wanted to create, the file and how to allow it; never
    called truncated (it is a complete file), and nothing runs."""
    from resnext_det.checkpoint.readers import read_weights_file, safe_pickle_load

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    _evil_pickle(evil, marker)
    wanted = f"{os.system.__module__}.system"  # posix.system
    with pytest.raises(CheckpointReadError) as e:
        safe_pickle_load(str(evil), what="MODEL.WEIGHTS = 'evil.pkl'")
    msg = str(e.value)
    assert msg.startswith("MODEL.WEIGHTS = 'evil.pkl'") and wanted in msg and "RESNEXT_DET_TRUST_PICKLE=1" in msg
    assert "--trust-pickle" not in msg  # tools/train_net.py has no such flag: the variable is the way
    with pytest.raises(CheckpointReadError) as e:
        read_weights_file(str(evil))
    msg = str(e.value)
    assert repr(str(evil)) in msg and wanted in msg and "--trust-pickle" in msg and "truncated" not in msg
    assert not marker.exists()


# --------------------------------------------------------------------------
# Unreadable files: one line naming the file and what is wrong
# --------------------------------------------------------------------------
def _bad_files(tmp_path, good: str):
    data = open(good, "rb").read()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    (tmp_path / "page.pth").write_text("<html>404 Not Found</html>")
    return {
        "truncated.pth": "truncated",
        "random.pth": "not a",
        "empty.pth": "empty|truncated",
        "list.pth": "not a checkpoint|not a dict",
        "page.pth": "not a",
        "missing.pth": "no such file|does not exist",
    }


def test_unreadable_files_give_clear_errors(tmp_path, tv26):
    _, d, r = tv26
    cases = _bad_files(tmp_path, str(d / "tv26-d2.pth"))
    cfg0 = detector_cfg("C4", config_pairs(r.metadata, str(d / "tv26-d2.pth")))
    model = build_model(cfg0)
    for name, pattern in cases.items():
        path = str(tmp_path / name)
        # Loading through MODEL.WEIGHTS.
        with pytest.raises((CheckpointReadError, FileNotFoundError, WeightsConfigError)) as e:
            ResNeXtCheckpointer(model, cfg=cfg0).load(path)
        assert "MODEL.WEIGHTS" in str(e.value) and any(w in str(e.value) for w in pattern.split("|")), (name, e.value)
        # Converting.
        with pytest.raises(CheckpointReadError) as e:
            convert_weights(path, progress=False)
        assert any(w in str(e.value) for w in pattern.split("|")), (name, e.value)
    p = run_tool(tmp_path / "truncated.pth", tmp_path / "x.pth", check=False)
    assert p.returncode == 2 and "truncated" in p.stderr and "Traceback" not in p.stderr


def test_truncated_file_message_gives_its_size_and_the_error(tmp_path, tv26):
    _, d, _ = tv26
    data = open(d / "tv26-d2.pth", "rb").read()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointReadError) as e:
        convert_weights(str(path), progress=False)
    msg = str(e.value)
    assert repr(str(path)) in msg and f"({len(data) // 3} bytes)" in msg
    cause = e.value.__cause__
    assert cause is not None and type(cause).__name__ in msg and str(cause)[:40] in msg
    assert "truncated" in msg and "sha256" in msg


@pytest.mark.usefixtures("one_thread")
def test_read_weights_file_errors_name_the_file(tmp_path):
    """Missing, a folder, empty, unknown, a corrupt Torch7 file, keys that are not names,
    no tensors: each a CheckpointReadError that names the file and what is wrong."""
    from resnext_det.checkpoint.readers import read_weights_file

    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "page.pth").write_bytes(b"<html>404 Not Found</html>")
    (tmp_path / "bad.t7").write_bytes(np.array([3, 1, 1, 99, 0, 0], "<i4").tobytes())
    torch.save({1: torch.zeros(1)}, tmp_path / "intkeys.pth")
    torch.save({"epoch": 3}, tmp_path / "none.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    cases = {"missing.pth": "does not exist", ".": "not a file", "empty.pth": "empty (0 bytes)",
             "page.pth": "starts with b'<html>", "bad.t7": "T7ReaderException", "intkeys.pth": "key 1 ",
             "none.pth": "no tensors", "list.pth": "holds a list"}  # fmt: skip
    for name, says in cases.items():
        path = str(tmp_path / name) if name != "." else str(tmp_path)
        with pytest.raises(CheckpointReadError) as e:
            read_weights_file(path)
        assert repr(path) in str(e.value) and says in str(e.value), (name, str(e.value))


@pytest.mark.usefixtures("one_thread")
def test_read_failure_message_for_a_missing_file_and_a_long_error():
    """A path that is not (or no longer) a file has 0 bytes; the error's text is cut at 300
    characters so that the message stays one readable line."""
    from resnext_det.checkpoint.readers import describe_read_failure

    msg = describe_read_failure("/nonexistent/w.pth", EOFError("Ran out of input"))
    assert msg.startswith("'/nonexistent/w.pth' (0 bytes)") and "EOFError: Ran out of input" in msg
    msg = describe_read_failure("/nonexistent/w.pth", ValueError("Q" * 300 + "Z" * 50), what="MODEL.WEIGHTS = 'w'")
    assert msg.startswith("MODEL.WEIGHTS = 'w' (0 bytes)") and "Q" * 300 in msg and "Z" not in msg


@pytest.mark.usefixtures("one_thread")
def test_an_unknown_format_shows_only_the_files_first_bytes(tmp_path):
    """A large file of an unknown format: the message quotes its first 16 bytes, not the
    whole file (an HTML page or a video dumped into one error line)."""
    from resnext_det.checkpoint.readers import read_weights_file

    head = b"GARBAGE-HEAD-16b"
    (tmp_path / "big.bin").write_bytes(head + b"x" * 20000 + b"TAIL")
    with pytest.raises(CheckpointReadError) as e:
        read_weights_file(str(tmp_path / "big.bin"))
    msg = str(e.value)
    assert repr(head) in msg and "TAIL" not in msg and len(msg) < 1000
