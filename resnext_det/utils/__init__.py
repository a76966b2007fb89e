# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Small helpers shared by the whole package; they import nothing of it."""
