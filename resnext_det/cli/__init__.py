# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""The command line, on top of everything it runs: what ``tools/train_net.py`` runs
(:mod:`.train_net`), where its processes stand and how they start (:mod:`.launch`:
Detectron2's ``launch``, torchrun, SLURM), ``tools/submit.py``'s submitit job
(:mod:`.submit`), and how every tool ends on a user error or Ctrl-C (:mod:`.tool`)."""
