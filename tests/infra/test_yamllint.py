"""yamllint over every YAML file in infra/ and the vendored schemas."""

from __future__ import annotations

import pytest
from yamllint import linter
from yamllint.config import YamlLintConfig

from tests.infra.infra_lib import INFRA, REPO, all_yaml_files

CONFIG = YamlLintConfig(file=str(INFRA / "yamllint.yaml"))
FILES = all_yaml_files()


def test_found_the_yaml_files():
    assert len(FILES) >= 8


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(REPO)) for p in FILES])
def test_yamllint(path):
    problems = list(linter.run(path.read_text(), CONFIG, str(path)))
    assert not problems, "\n".join(
        f"{path.name}:{p.line}:{p.column} {p.rule}: {p.desc}" for p in problems
    )
