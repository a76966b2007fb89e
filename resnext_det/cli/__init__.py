# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""The command line, on top of everything it runs (docs/architecture.md): what each tool of
``tools/`` runs once it has parsed its arguments.

* :mod:`.train_net`: ``tools/train_net.py`` (train, the Appendix B schedule, ``--eval-only``)
* :mod:`.launch`, :mod:`.placement`: its processes under Detectron2's ``launch``, torchrun and SLURM
* :mod:`.submit`, :mod:`.job_wait`: ``tools/submit.py``, the same run as a submitit job
* :mod:`.demo`, :mod:`.run_demo`, :mod:`.convert_pretrained`: ``tools/demo.py``,
  ``tools/run_demo.py`` (``make demo``), ``tools/convert_pretrained.py``
* :mod:`.tool`: how every tool ends on a user error or Ctrl-C (:func:`~.tool.run_tool`)
"""
