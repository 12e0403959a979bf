"""Every ```sql block in README.md and docs/*.md runs against the test cluster: the
examples a DBA copies from the docs must work with the views as they are."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(path, i, block) for path in DOCS
          for i, block in enumerate(re.findall(r"```sql\n(.*?)```", path.read_text(), re.S))]


def test_the_docs_have_sql_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("path,i,block", BLOCKS, ids=[f"{p.name}#{i}" for p, i, _ in BLOCKS])
def test_sql_example_runs(cluster, path, i, block):
    # Over TCP, so the connection views have at least this connection in them.
    cluster.sql(block, host="127.0.0.1")
