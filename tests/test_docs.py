"""Docs that run: the README's client snippets (Python client, curl on the HTTP API, the `openai` package) and the
`pdllm.client` docstring example, executed as written against a real `pdllm serve --http-port` on loopback with the
bundled model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pdllm.cluster.kv.redis_server import free_port

import pdllm.client

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "docs-token"
SNIPPET = re.compile(r"<!-- snippet: (\S+) -->\n```(\w+)\n(.*?)```", re.S)


def readme_snippets() -> dict[str, tuple[str, str]]:
    return {name: (lang, code) for name, lang, code in SNIPPET.findall((ROOT / "README.md").read_text())}


def docstring_example() -> str:
    """The indented block of pdllm.client's module docstring."""
    lines = pdllm.client.__doc__.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("    "))
    block = []
    for line in lines[start:]:
        if line and not line.startswith("    "):
            break
        block.append(line)
    return textwrap.dedent("\n".join(block))


@pytest.fixture(scope="module")
def served():
    """`pdllm serve --in-process --http-port` with the bundled model; yields the snippets' environment."""
    port, http_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "pdllm.cli", "serve", "--in-process", "--device", "cpu", "--no-batch"]
    cmd += ["--port", str(port), "--http-port", str(http_port), "--auth-token", TOKEN, "--no-metrics"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "serving on" in line:
                break
        assert any("serving on" in line for line in lines), "".join(lines) + proc.stderr.read()[-2000:]
        assert any(f"HTTP API on http://127.0.0.1:{http_port}/v1" in line for line in lines), lines
        env = {**os.environ, "PDLLM_SERVER": f"127.0.0.1:{port}", "PDLLM_AUTH_TOKEN": TOKEN}
        yield {**env, "PDLLM_HTTP_PORT": str(http_port)}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def run_snippet(lang: str, code: str, env: dict) -> str:
    cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-c", code]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert out.returncode == 0, f"{lang} snippet failed:\n{code}\n{out.stderr[-3000:]}"
    return out.stdout


def test_readme_has_the_three_client_snippets():
    assert set(readme_snippets()) == {"python-client", "curl", "openai"}


@pytest.mark.parametrize("name", ["python-client", "curl", "openai"])
def test_readme_snippet_runs(served, name):
    lang, code = readme_snippets()[name]
    out = run_snippet(lang, code, served)
    if name == "curl":
        reply = json.loads(out)
        assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] >= 1, reply
    elif name == "python-client":
        assert out.splitlines()[-1].startswith("final"), out  # the stream ends in its answer
    else:
        assert "CompletionUsage(" in out, out


def test_client_docstring_example_runs(served):
    code = docstring_example()
    assert "Client(" in code
    assert run_snippet("python", code, served).strip()
