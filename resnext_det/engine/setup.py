# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""What every entry point does before it builds a model: read the config (with
errors that name the file or key, and the closest existing keys for a misspelt one),
set up logging the same way everywhere, share the CPU cores between local processes,
and say what the config asks for that cannot happen here (CUDA without a GPU,
``MODEL.RESNETS`` keys beside a ResNeXt).

Two steps, so that an entry point can refuse what it finds wrong between them:
:func:`read_cfg` (the config alone, nothing logged or written) and :func:`setup_run`
(Detectron2's ``default_setup``, which logs the environment and the whole config and
writes ``OUTPUT_DIR/config.yaml``; the package's logger). :func:`setup_cfg` does both."""
import difflib
import logging
import os
import re
from typing import Iterator, List, Optional, Sequence

import torch
import yaml

import detectron2.utils.comm as comm
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import default_setup
from detectron2.utils.logger import setup_logger

from ..config import add_resnext_config
from ..errors import ConfigError, MissingFileError
from ..utils.io import remove_stale_temporaries
from ..utils.cores import available_cores  # its home; importable from here too (__all__)

__all__ = [
    "available_cores", "check_lazy_device", "close_keys", "fit_dataloader_workers", "processes_on_host",
    "read_cfg", "remove_run_temporaries", "set_processes_on_host", "setup_cfg", "setup_logging", "setup_run", "share_cpu_cores",
    "warn_ignored_keys", "PACKAGE_LOGGER",
]  # fmt: skip

PACKAGE_LOGGER = "resnext_det"
logger = logging.getLogger(__name__)
#: yacs's words for a key the config does not have: ``merge_from_file`` raises a KeyError
#: "Non-existent config key: A.B" (the first level that is missing), ``merge_from_list`` an
#: AssertionError "Non-existent key: A.B.C" (the key as given).
_NO_SUCH_KEY = re.compile(r"Non-existent (?:config )?key: (\S+)")


def _dotted_names(node: CfgNode, prefix: str = "") -> Iterator[str]:
    for k, v in node.items():
        yield prefix + k
        if isinstance(v, CfgNode):
            yield from _dotted_names(v, prefix + k + ".")


def close_keys(cfg: CfgNode, key: str, n: int = 3) -> List[str]:
    """The keys of ``cfg`` (full dotted names, nodes and leaves) closest to ``key``
    by :mod:`difflib`: the closest, and the others about as close (at most ``n``)."""
    names = list(_dotted_names(cfg))
    found = difflib.get_close_matches(key, names, n=n, cutoff=0.7)
    if not found:
        return []
    best = difflib.SequenceMatcher(None, key, found[0]).ratio()
    return [k for k in found if difflib.SequenceMatcher(None, key, k).ratio() >= best - 0.06]


def _unknown_key(cfg: CfgNode, error: BaseException) -> Optional[str]:
    """For yacs's "Non-existent key" error: "K is not a config key: did you mean X?" (or
    how to check the spelling); None for any other error."""
    m = _NO_SUCH_KEY.search(str(error.args[0] if error.args else error))
    if not m:
        return None
    key = m.group(1)
    near = close_keys(cfg, key)
    if near:
        return f"{key} is not a config key: did you mean {' or '.join(near)}?"
    return (
        f"{key} is not a config key: check its spelling against Detectron2's defaults "
        "(detectron2/config/defaults.py) and MODEL.RESNEXT.* / UNSHARED.* (resnext_det/config.py)"
    )


def _merge_file(cfg: CfgNode, config_file: str) -> None:
    if not os.path.isfile(config_file):
        raise MissingFileError(
            f"--config-file {config_file!r} does not exist (shipped configs: "
            "resnext_det.get_config_file('COCO-Detection/...') or the configs/ folder)"
        )
    try:
        with open(config_file) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"--config-file {config_file!r} is not valid YAML: {e}") from e
    if not isinstance(data, dict) or not data:
        kind = "empty" if not data else f"a {type(data).__name__}, not a mapping of keys"
        raise ConfigError(
            f"--config-file {config_file!r} is {kind}: a Detectron2 config is a YAML mapping "
            "such as `MODEL: {...}` (see configs/Base-ResNeXt-FPN.yaml)"
        )
    try:
        cfg.merge_from_file(config_file)
    except (KeyError, ValueError, TypeError, AssertionError) as e:
        text = _unknown_key(cfg, e) or (e.args[0] if isinstance(e, KeyError) and e.args else e)
        raise ConfigError(f"--config-file {config_file!r}: {text}") from e


def override_keys(opts: Sequence[str]) -> List[str]:
    """The KEYs of the command line's ``KEY VALUE ...`` config overrides."""
    return [str(k) for k in list(opts)[::2]]


def _merge_opts(cfg: CfgNode, opts: Sequence[str]) -> None:
    opts = list(opts)
    if opts[:1] == ["--"]:
        opts = opts[1:]
    if len(opts) % 2:
        raise ConfigError(
            f"config overrides come in KEY VALUE pairs; {len(opts)} words were given, the last "
            f"is {opts[-1]!r}: add its value or remove it"
        )
    try:
        cfg.merge_from_list(opts)
    except (KeyError, ValueError, TypeError, AssertionError) as e:
        text = _unknown_key(cfg, e) or (e.args[0] if isinstance(e, KeyError) and e.args else e)
        raise ConfigError(f"config override: {text}") from e


def _check_device(cfg: CfgNode, fallback: bool = True) -> None:
    dev = cfg.MODEL.DEVICE
    try:
        kind = torch.device(dev).type
    except RuntimeError as e:
        raise ConfigError(f"MODEL.DEVICE {dev!r} is not a device: use 'cpu' or 'cuda'") from e
    if fallback and kind == "cuda" and not torch.cuda.is_available():
        if comm.get_world_size() > 1:
            raise ConfigError(
                f"MODEL.DEVICE is {dev!r} but this machine has no CUDA device: append "
                "MODEL.DEVICE cpu (several CPU processes train with gloo), or run on a GPU machine"
            )
        logger.warning("MODEL.DEVICE is %r but there is no CUDA device: running on the CPU.", dev)
        cfg.MODEL.DEVICE = "cpu"


def check_lazy_device(cfg) -> None:
    """A LazyConfig (``tools/lazyconfig_train_net.py``) that asks for hardware that is not
    here: fail early, naming the override."""
    device = str(cfg.train.get("device", "cuda"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"train.device = {device!r} but CUDA is not available: add the override "
            "train.device=cpu (and train.amp.enabled=False)."
        )
    if cfg.train.get("amp", {}).get("enabled", False) and not device.startswith("cuda"):
        raise ConfigError(
            f"train.amp.enabled = True needs a CUDA device, but train.device = {device!r}: "
            "add the override train.amp.enabled=False."
        )


def warn_ignored_keys(cfg: CfgNode) -> List[str]:
    """Warn once about Detectron2 ResNet keys that a ResNeXt backbone ignores when the
    config sets them to non-defaults (``MODEL.RESNETS.*``, ``MODEL.BACKBONE.FREEZE_AT``);
    returns the keys."""
    if "resnext" not in cfg.MODEL.BACKBONE.NAME:
        return []
    d = get_cfg()
    keys = [f"MODEL.RESNETS.{k}" for k in cfg.MODEL.RESNETS if cfg.MODEL.RESNETS[k] != d.MODEL.RESNETS[k]]
    if cfg.MODEL.BACKBONE.FREEZE_AT != d.MODEL.BACKBONE.FREEZE_AT:
        keys.append("MODEL.BACKBONE.FREEZE_AT")
    if keys:
        logger.warning(
            "%s set, but MODEL.BACKBONE.NAME %r reads MODEL.RESNEXT.* only: they are ignored "
            "(set the MODEL.RESNEXT key of the same meaning, e.g. MODEL.RESNEXT.FREEZE_AT, "
            "MODEL.RESNEXT.DEPTH, MODEL.RESNEXT.CARDINALITY).",
            ", ".join(keys),
            cfg.MODEL.BACKBONE.NAME,
        )
    return keys


def setup_logging(output_dir: Optional[str] = None) -> None:
    """The package's logger (INFO) on the console of the main process and, with
    ``output_dir``, in its ``log.txt`` (as Detectron2's own loggers). Idempotent."""
    setup_logger(output_dir, distributed_rank=comm.get_rank(), name=PACKAGE_LOGGER, abbrev_name="rxd")


_PROCESSES_ON_HOST: Optional[int] = None


def set_processes_on_host(n: int) -> None:
    """Record how many processes of the job share this host (the launcher counts them
    by host name once the group exists: two 'machines' of one host, or torchrun's and
    SLURM's tasks, count too)."""
    global _PROCESSES_ON_HOST
    _PROCESSES_ON_HOST = max(1, int(n))


def processes_on_host() -> int:
    """The job's processes on this host: as recorded by the launcher, else Detectron2's
    local process group's size."""
    return _PROCESSES_ON_HOST or comm.get_local_size()


def fit_dataloader_workers(cfg: CfgNode) -> Optional[str]:
    """Lower ``DATALOADER.NUM_WORKERS`` to the cores available to each process of this
    host when the config asks for more (Detectron2's default 4 on a 2-core machine makes
    PyTorch warn, and the workers only compete for the cores). Returns the line to log,
    or None when nothing changed."""
    here = processes_on_host()
    per_process = max(1, available_cores() // here)
    asked = cfg.DATALOADER.NUM_WORKERS
    if asked <= per_process:
        return None
    cfg.DATALOADER.NUM_WORKERS = per_process
    return (
        f"DATALOADER.NUM_WORKERS {asked} -> {per_process}: {available_cores()} CPU core(s) for "
        f"{here} process(es) on this machine"
    )


def share_cpu_cores(cfg: CfgNode) -> None:
    """Several CPU processes on one host: one share of its cores each (PyTorch would
    give every process all of them, and oversubscribed threads crawl), counting every
    process of the job on the host, however it was started. OMP_NUM_THREADS, when set,
    wins."""
    here = processes_on_host()
    if torch.device(cfg.MODEL.DEVICE).type != "cpu" or here <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    threads = max(1, available_cores() // here)
    torch.set_num_threads(threads)
    logger.info(f"{here} CPU processes on this machine: {threads} thread(s) each")


def read_cfg(config_file: str, opts: Optional[Sequence[str]] = None, *, device_fallback: bool = True) -> CfgNode:
    """The config alone: Detectron2's defaults with the resnext_det keys added,
    ``config_file`` and ``opts`` merged (errors name the file or key, and the closest
    keys to a misspelt one), ``MODEL.DEVICE`` falling back to the CPU where there is no
    GPU (``device_fallback=False`` keeps it as configured, to check it). Not frozen;
    nothing is written. Finish it with :func:`setup_run`.
    """
    cfg = get_cfg()
    add_resnext_config(cfg)
    _merge_file(cfg, config_file)
    _merge_opts(cfg, opts or [])
    _check_device(cfg, device_fallback)
    return cfg


def remove_run_temporaries(output_dir: str) -> int:
    """Remove the temporary files that writes killed half way left in a run's
    ``output_dir`` and its folders (the Appendix B stage folders): the one clean-up of a
    run, at its start, on the main process (no other process of the run writes yet).
    Returns how many were removed."""
    folders = [output_dir]
    if os.path.isdir(output_dir):
        folders += sorted(e.path for e in os.scandir(output_dir) if e.is_dir())
    total = 0
    for folder in folders:
        n = remove_stale_temporaries(folder)
        if n:
            logger.info("Removed %d temporary file(s) that interrupted writes left in %s", n, folder)
        total += n
    return total


def setup_run(cfg: CfgNode, args=None, *, freeze: bool = True) -> CfgNode:
    """``cfg`` (from :func:`read_cfg`) ready for a run: ``DATALOADER.NUM_WORKERS`` at
    most the cores of this process's share (:func:`fit_dataloader_workers`). With
    ``args`` (from :func:`detectron2.engine.default_argument_parser`), also runs
    Detectron2's :func:`default_setup` (output folder, seeds, its loggers; it logs the
    environment and the whole config and writes ``OUTPUT_DIR/config.yaml``) and sets
    up the package's logger and the CPU-core share of this process, and removes the
    temporary files that writes killed half way left in ``OUTPUT_DIR`` and its folders
    (:func:`remove_stale_temporaries`, on the main process): what should end a run before
    all that is checked before this call. Returns ``cfg``.
    """
    workers = fit_dataloader_workers(cfg)  # before default_setup writes OUTPUT_DIR/config.yaml
    if args is not None:
        default_setup(cfg, args)
        setup_logging(cfg.OUTPUT_DIR)
        share_cpu_cores(cfg)
        if comm.is_main_process():
            remove_run_temporaries(cfg.OUTPUT_DIR)
    if workers:
        logger.info(workers)
    warn_ignored_keys(cfg)
    if freeze:
        cfg.freeze()
    return cfg


def setup_cfg(
    config_file: str,
    opts: Optional[Sequence[str]] = None,
    *,
    args=None,
    freeze: bool = True,
    device_fallback: bool = True,
) -> CfgNode:
    """:func:`read_cfg`, then :func:`setup_run`: the config of ``config_file`` and
    ``opts`` (errors name the file or key), ``MODEL.DEVICE`` falling back to the CPU
    where there is no GPU, ``DATALOADER.NUM_WORKERS`` at most the cores of this
    process's share; with ``args``, also Detectron2's :func:`default_setup` and the
    package's logger. ``device_fallback=False`` keeps ``MODEL.DEVICE`` as configured.
    """
    cfg = read_cfg(config_file, opts, device_fallback=device_fallback)
    return setup_run(cfg, args, freeze=freeze)
