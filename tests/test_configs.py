"""Every config file loads in every mode and passes validation; every field carries a comment."""

import glob
import inspect
import os
import re

import pytest

from drex import config as config_lib
from drex.cli import load_config_file
from drex.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STREAMS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py")) if not p.endswith("base_tiny.py"))


REAL_DATA = ("internvl2_1b_cl.py", "internvl2_2b_cl.py", "internvl2_8b_cl.py")  # local data paths required


@pytest.mark.parametrize("path", STREAMS, ids=os.path.basename)
@pytest.mark.parametrize("mode", ["", ":smoke"])
def test_stream_configs_load_and_validate(path, mode):
  cfg = load_config_file(path + mode)
  if os.path.basename(path) in REAL_DATA and not mode:  # the paths to the user's copies are required
    with pytest.raises(UserError, match=r"config.sources.\w+.\w+ is not set: REQUIRED"):
      config_lib.validate(cfg)
    return
  config_lib.validate(cfg)
  if mode:  # seconds to minutes on a CPU: one task, or the real-data stream on drex's fixture files
    assert cfg.expert_training.steps < 50 and (len(cfg.tasks) == 1 or cfg.data.fixtures)


def test_readme_own_data_example_is_a_valid_config():
  """The README's "your own data" config file, as written there, loads and validates."""
  readme = open(os.path.join(ROOT, "README.md")).read()
  code = readme.split("### Your own data", 1)[1].split("```python", 1)[1].split("```", 1)[0]
  namespace: dict = {}
  exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  cfg = namespace["get_config"]()
  config_lib.validate(cfg)
  assert cfg.sources.receipts.kind == "internvl" and cfg.sources.charts.kind == "llava"
  assert set(cfg.tasks) | set(cfg.foundation) == set(cfg.sources)


def test_base_config_modes():
  for mode in ("", ":smoke", ":gpu", ":continue"):
    assert load_config_file(os.path.join(ROOT, "configs", "base_tiny.py") + mode).steps > 0
  assert load_config_file(os.path.join(ROOT, "configs", "base_tiny.py:continue")).init_from == "runs/base_tiny/base"


def test_every_field_has_a_comment():
  for fn in (config_lib.stream_config, config_lib.internvl2_stream, config_lib.internvl2_cl_stream):
    for line in inspect.getsource(fn).splitlines():
      if re.match(r"\s+c(\.\w+)+ = ", line) and "ConfigDict()" not in line:
        assert "#" in line, f"config field without a comment: {line.strip()}"
  from drex.adapters import routers  # pylint: disable=g-import-not-at-top
  for cls in routers.REGISTRY.values():  # config.router's fields come from the routers' OPTIONS
    for name, (_, comment) in cls.OPTIONS.items():
      assert comment.strip(), f"router option {cls.KIND}.{name} without a comment"


def test_validation_errors_name_the_field():
  cfg = config_lib.stream_config()
  cfg.router.kind = "phatgoose"
  with pytest.raises(UserError, match="config.router.kind"):
    config_lib.validate(cfg)
  cfg = config_lib.stream_config()
  cfg.lora.r = 0
  with pytest.raises(UserError, match="config.lora.r must be >= 1"):
    config_lib.validate(cfg)
  cfg = config_lib.stream_config()
  cfg.data.eval_split = "train"
  with pytest.raises(UserError, match="config.data.eval_split must be one of"):
    config_lib.validate(cfg)
