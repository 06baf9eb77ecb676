"""The layers hold: every module's imports (at its top and inside its functions) point down.

From the bottom: `data_pipelines` (reads and prepares the data; imports none of the others),
`msatt_jax` (models, training, inference, the model commands), `configs` (run settings, built
from the defaults of the two below), `benchmarks` (measures everything). A module may import its
own package and those below it; only `benchmarks` and the tests import `benchmarks`.
"""

import ast
from pathlib import Path
import textwrap
from typing import Iterator, List, Tuple

from helpers import REPO

LAYERS = ("data_pipelines", "msatt_jax", "configs", "benchmarks")  # Bottom to top.


def imports(source: str) -> Iterator[Tuple[int, str]]:
  """(line, module) of every absolute import in the source, wherever it stands."""
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      for alias in node.names:
        yield node.lineno, f"{node.module}.{alias.name}"


def forbidden_arrows(root: Path) -> List[str]:
  """'<file>:<line>: <module> imports <module>' for every import that points up a layer."""
  found = []
  for rank, package in enumerate(LAYERS):
    allowed = LAYERS[:rank + 1]
    for path in sorted((root / package).rglob("*.py")):
      module = ".".join(path.relative_to(root).with_suffix("").parts)
      for line, imported in sorted(imports(path.read_text(encoding="utf-8"))):
        top = imported.split(".")[0]
        if top in LAYERS and top not in allowed:
          found.append(f"{path.relative_to(root)}:{line}: {module} imports {imported} "
                       f"({package} may import only {', '.join(allowed)})")
  return found


def test_no_module_imports_a_layer_above_its_own():
  assert sum(1 for p in LAYERS for _ in (REPO / p).rglob("*.py")) > 50  # The tree was read.
  found = forbidden_arrows(REPO)
  assert not found, "imports that point up a layer:\n" + "\n".join(found)


def test_an_upward_import_is_named_with_its_file_line_and_target(tmp_path):
  for package in LAYERS:
    (tmp_path / package).mkdir()
  (tmp_path / "data_pipelines" / "prepare.py").write_text(textwrap.dedent("""\
      from data_pipelines import files
      from configs import brats18

      def run():
        from msatt_jax import cli
        import benchmarks.faults
  """))
  (tmp_path / "msatt_jax" / "train.py").write_text(
      "import configs.brats18\nfrom data_pipelines import prepare\n")
  (tmp_path / "configs" / "brats18.py").write_text(
      "from msatt_jax import models\nfrom benchmarks import run\n")
  (tmp_path / "benchmarks" / "run.py").write_text("from configs import brats18\n")
  assert forbidden_arrows(tmp_path) == [
      "data_pipelines/prepare.py:2: data_pipelines.prepare imports configs.brats18 "
      "(data_pipelines may import only data_pipelines)",
      "data_pipelines/prepare.py:5: data_pipelines.prepare imports msatt_jax.cli "
      "(data_pipelines may import only data_pipelines)",
      "data_pipelines/prepare.py:6: data_pipelines.prepare imports benchmarks.faults "
      "(data_pipelines may import only data_pipelines)",
      "msatt_jax/train.py:1: msatt_jax.train imports configs.brats18 "
      "(msatt_jax may import only data_pipelines, msatt_jax)",
      "configs/brats18.py:2: configs.brats18 imports benchmarks.run "
      "(configs may import only data_pipelines, msatt_jax, configs)",
  ]
