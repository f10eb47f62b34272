"""Every shell command in README.md and docs/ runs (or dry-runs) here, and the generated numbers match
their JSON, so no command or number in the docs goes stale silently.

Each fenced `bash` block is split into commands; each command goes to the handler of its program:
cheap commands run for real (`spikemax --help`, `spikemax neurons` on a tiny checkpoint,
`optuna-dashboard` on a tiny study, `sed` on a copy of params.yaml, `python docs/tables.py --check`),
long ones are dry-run (`make -n`, the command's `--help` listing every option the doc uses, the DVC
stage and `-S` parameters it names, the files it reads). A program without a handler fails the test:
add a handler or mark the block `<!-- docs-test: skip REASON -->` (and raise SKIPPED below).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from spikemax import params as P

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Blocks marked `<!-- docs-test: skip ... -->` per file: a new one has to be counted here too.
SKIPPED = {"docs/scaling.md": 3}
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)\s*$")
SKIP = re.compile(r"<!-- docs-test: skip (?P<reason>\S.*?) -->")
ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}


@dataclass
class Block:
    """One fenced code block of a doc."""

    doc: str
    line: int
    lang: str
    text: str
    skip: str | None = None


@dataclass
class Command:
    """One simple command of a block: its words after `VAR=value` prefixes."""

    block: Block
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.block.doc}:{self.block.line}: {shlex.join(self.argv)}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of one Markdown file, with the skip marker on the line before a fence."""
    out: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, start = len(m["indent"]), i
        body = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:])
            i += 1
        prev = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
        skip = SKIP.search(prev)
        out.append(Block(str(path.relative_to(ROOT)), start + 1, m["lang"], "\n".join(body), skip and skip["reason"]))
        i += 1
    return out


def all_blocks(lang: str) -> list[Block]:
    """Every block of one language in README.md and docs/*.md."""
    return [b for p in DOCS for b in blocks(p) if b.lang == lang]


def commands(block: Block) -> list[Command]:
    """Simple commands of a bash block (continuations joined, comments dropped, split on && ; |)."""
    out = []
    lex = shlex.shlex(block.text.replace("\\\n", " "), posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    lex.commenters = "#"
    words: list[str] = []
    for tok in [*lex, ";"]:
        if tok in (";", "&&", "|", "||", "&") or tok == "\n":
            if words:
                env = {}
                while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
                    k, v = words.pop(0).split("=", 1)
                    env[k] = v
                if words:
                    out.append(Command(block, words, env))
            words = []
        else:
            words.append(tok)
    return out


def split_lines(block: Block) -> list[Command]:
    """Commands per line: shlex drops newlines, so each logical line is lexed on its own."""
    out = []
    for line in block.text.replace("\\\n", " ").splitlines():
        out += commands(Block(block.doc, block.line, block.lang, line))
    return out


def run(argv: list[str], cwd: Path = ROOT, timeout: float = 120, env: dict | None = None) -> str:
    """Run a command; fail the test with its output when it exits non-zero."""
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**ENV, **(env or {})})
    assert proc.returncode == 0, (
        f"{shlex.join(argv)} exited {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    )
    return proc.stdout + proc.stderr


def options(argv: list[str]) -> list[str]:
    """The long and short options a command line uses (`--port 5000` and `--port=5000` give `--port`)."""
    return [a.split("=", 1)[0] for a in argv if re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", a)]


def help_lists(argv_help: list[str], used: list[str], cmd: Command) -> None:
    """The command's --help names every option the doc uses."""
    text = run(argv_help)
    for opt in used:
        if opt in ("--help", "-h"):
            continue
        assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text), (
            f"{cmd}: {opt} is not in `{shlex.join(argv_help)}`"
        )


def program(argv0: str) -> str:
    """`.venv/bin/X` and `X` name the same program: the one in this interpreter's environment."""
    return Path(argv0).name if argv0.startswith(".venv/bin/") else argv0


def exe(name: str) -> str:
    """Path of an installed console script (the venv's first)."""
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    assert found, f"{name} is not installed"
    return found


def default_params() -> P.Params:
    """The project's params.yaml, validated."""
    return P.load(ROOT / "params.yaml", root=ROOT)[0]


def param_exists(key: str) -> bool:
    """A dotted params key (`maximize.budget`) that params.yaml's schema knows."""
    node: object = default_params()
    for part in key.split("."):
        if isinstance(node, dict):
            if part not in node:
                return False
            node = node[part]
        elif hasattr(node, part):
            node = getattr(node, part)
        else:
            return False
    return True


def default_last_checkpoint() -> str:
    """File name of the last checkpoint the default params write (models/snn/step=S-epoch=E.ckpt)."""
    from spikemax.snn import checkpoint_name

    p = default_params()
    train = p.prepare.train_size * (1 - p.prepare.val_fraction)
    steps = math.ceil(train / p.snn.batch_size) * p.snn.epochs
    return checkpoint_name(steps, float(p.snn.epochs))


def check_checkpoint_path(cmd: Command) -> None:
    """A documented `models/snn/...ckpt` is the name the default run writes."""
    for a in cmd.argv:
        if a.startswith("models/snn/"):
            assert Path(a).name == default_last_checkpoint(), (
                f"{cmd}: the default run writes {default_last_checkpoint()}"
            )


def dvc_stages() -> set[str]:
    """Stage names of dvc.yaml (foreach stages also as NAME@ITEM)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    names = set(stages)
    for name, st in stages.items():
        for item in st.get("foreach", []) if isinstance(st, dict) else []:
            names.add(f"{name}@{item}")
    return names


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- handlers: one per program; each runs or dry-runs the command and returns "run" or "dry" ----


def h_make(cmd: Command, ctx: dict) -> str:
    targets = [a for a in cmd.argv[1:] if not a.startswith("-")]
    run(["make", "-n", *targets])
    return "dry"


def h_spikemax(cmd: Command, ctx: dict) -> str:
    args = cmd.argv[1:]
    sub = [a for a in args[:1] if not a.startswith("-")]
    if not sub or args == [*sub, "--help"]:
        run([exe("spikemax"), *args])
        return "run"
    check_checkpoint_path(cmd)
    if sub == ["neurons"]:
        ckpt = next(a for a in args if a.startswith("models/snn/"))
        proj = ctx["tmp"] / "neurons"
        (proj / ckpt).parent.mkdir(parents=True, exist_ok=True)
        if not (proj / ckpt).exists():
            (proj / ckpt).symlink_to(ctx["checkpoint"]())
        out = run([exe("spikemax"), *args], cwd=proj)
        assert "class:" in out or "out" in out, f"{cmd}: {out}"
        return "run"
    help_lists([exe("spikemax"), *sub, "--help"], options(args), cmd)
    return "dry"


def h_dvc(cmd: Command, ctx: dict) -> str:
    args = cmd.argv[1:]
    sub = []
    for a in args:
        if a.startswith("-"):
            break
        sub.append(a)
    if sub[:1] == ["repro"]:
        for stage in sub[1:]:
            assert stage in dvc_stages(), f"{cmd}: no stage {stage} in dvc.yaml"
        sub = ["repro"]
    for i, a in enumerate(args):
        if a == "-S":
            key, value = args[i + 1].split("=", 1)
            assert param_exists(key), f"{cmd}: {key} is not a params.yaml key"
            raw = yaml.safe_load((ROOT / "params.yaml").read_text())
            node = raw
            *parents, last = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = yaml.safe_load(value)  # DVC parses -S values as YAML too
            P.validate(raw)
    help_lists([exe("dvc"), *sub, "--help"], options(args), cmd)
    return "dry"


def h_mlflow(cmd: Command, ctx: dict) -> str:
    args = cmd.argv[1:]
    help_lists([exe("mlflow"), args[0], "--help"], options(args), cmd)
    uri = next((args[i + 1] for i, a in enumerate(args) if a == "--backend-store-uri"), None)
    if uri and uri.startswith("sqlite:///"):
        assert uri == "sqlite:///mlruns/mlflow.db", f"{cmd}: the project's store is sqlite:///mlruns/mlflow.db"
    return "dry"


def h_optuna_dashboard(cmd: Command, ctx: dict) -> str:
    """Really start the dashboard on a tiny study in the documented storage path, then ask for its studies."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    args = cmd.argv[1:]
    storage = next(a for a in args if not a.startswith("-") and not a.isdigit())
    proj = ctx["tmp"] / "dashboard"
    (proj / storage).parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="tt-sngan-doc",
        storage=optuna.storages.JournalStorage(JournalFileBackend(str(proj / storage))),
        direction="maximize",
    )
    study.optimize(lambda t: t.suggest_float("lr", 0.01, 0.3), n_trials=2)
    port = free_port()
    argv = [exe("optuna-dashboard"), *[str(port) if a.isdigit() else a for a in args]]
    proc = subprocess.Popen(argv, cwd=proj, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    studies = json.loads(r.read())
                break
            except OSError:
                assert proc.poll() is None, f"{cmd}: exited {proc.returncode}: {proc.stdout.read()[-2000:]}"
                assert time.monotonic() < deadline, f"{cmd}: no answer on port {port}"
                time.sleep(0.5)
        assert [s["study_name"] for s in studies["study_summaries"]] == ["tt-sngan-doc"], studies
    finally:
        proc.terminate()
        proc.wait(10)
    return "run"


def h_python(cmd: Command, ctx: dict) -> str:
    script, args = cmd.argv[1], cmd.argv[2:]
    assert (ROOT / script).is_file(), f"{cmd}: no {script}"
    check_checkpoint_path(cmd)
    if script == "docs/tables.py":
        run([sys.executable, script, *args, "--check"])
        return "run"
    help_lists([sys.executable, script, "--help"], options(args), cmd)
    return "dry"


def h_pytest(cmd: Command, ctx: dict) -> str:
    args = cmd.argv[1:]
    help_lists([sys.executable, "-m", "pytest", "--help"], options(args), cmd)
    if "-m" in args:
        marker = args[args.index("-m") + 1].split()[-1]
        markers = run([sys.executable, "-m", "pytest", "--markers"])
        assert f"@pytest.mark.{marker}:" in markers, f"{cmd}: marker {marker} is not registered"
    return "dry"


def h_pip(cmd: Command, ctx: dict) -> str:
    """`pip install -e '.[EXTRA]'`: the extra exists in pyproject.toml."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for a in cmd.argv[2:]:
        if m := re.fullmatch(r"\.\[(\w+)\]", a):
            assert m[1] in extras, f"{cmd}: no extra {m[1]}"
    return "dry"


def h_cp(cmd: Command, ctx: dict) -> str:
    """`cp CONFIG params.yaml`: the config exists and validates as params."""
    src, dst = cmd.argv[1], cmd.argv[2]
    assert (ROOT / src).is_file(), f"{cmd}: no {src}"
    if dst == "params.yaml":
        P.load(ROOT / src, root=ctx["tmp"])
    return "dry"


def h_sed(cmd: Command, ctx: dict) -> str:
    """`sed -i EXPR FILE`: run on a copy; the file changes and still validates."""
    target = cmd.argv[-1]
    copy = ctx["tmp"] / "sed" / target
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / target, copy)
    run(["sed", *cmd.argv[1:-1], str(copy)])
    assert copy.read_text() != (ROOT / target).read_text(), f"{cmd}: changed nothing"
    if target == "params.yaml":
        P.load(copy, root=copy.parent)
    return "run"


def h_export(cmd: Command, ctx: dict) -> str:
    assert all(re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S+", a) for a in cmd.argv[1:]), str(cmd)
    return "run"


HANDLERS = {
    "make": h_make,
    "spikemax": h_spikemax,
    "dvc": h_dvc,
    "mlflow": h_mlflow,
    "optuna-dashboard": h_optuna_dashboard,
    "python": h_python,
    "pytest": h_pytest,
    "pip": h_pip,
    "cp": h_cp,
    "sed": h_sed,
    "export": h_export,
}


def test_fences_parse_and_skips_are_counted():
    """Every bash block parses (`bash -n`), skipped blocks name a reason and match SKIPPED."""
    skipped: dict[str, int] = {}
    bash = all_blocks("bash")
    assert len(bash) >= 10
    for b in bash:
        proc = subprocess.run(["bash", "-n"], input=b.text, capture_output=True, text=True)
        assert proc.returncode == 0, f"{b.doc}:{b.line}: {proc.stderr}"
        if b.skip:
            skipped[b.doc] = skipped.get(b.doc, 0) + 1
    assert skipped == SKIPPED
    # a marker must sit right before a fence, or it silently does nothing
    for p in DOCS:
        for i, line in enumerate(p.read_text().splitlines()):
            if "docs-test:" in line:
                assert SKIP.search(line), f"{p.name}:{i + 1}: malformed marker"


@pytest.mark.slow
def test_every_documented_command_runs_or_dry_runs(tmp_path, snn_checkpoints):
    ctx = {"tmp": tmp_path, "checkpoint": lambda: snn_checkpoints[max(snn_checkpoints)]}
    done: dict[str, int] = {"run": 0, "dry": 0}
    for b in all_blocks("bash"):
        if b.skip:
            continue
        for cmd in split_lines(b):
            name = program(cmd.argv[0])
            assert name in HANDLERS, f"{cmd}: no handler for `{name}`; add one here or mark the block skipped"
            done[HANDLERS[name](cmd, ctx)] += 1
    print(f"docs commands: {done['run']} run, {done['dry']} dry-run, {sum(SKIPPED.values())} blocks skipped")
    assert done["run"] >= 5 and done["dry"] >= 10


def test_yaml_blocks_are_valid_params():
    """A params snippet in the docs merges into params.yaml and validates."""
    snippets = all_blocks("yaml")
    assert snippets
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    for b in snippets:
        part = yaml.safe_load(b.text)
        merged = {**base}
        for section, vals in part.items():
            merged[section] = {**base.get(section, {}), **vals} if isinstance(vals, dict) else vals
        P.validate(merged)


def test_generated_numbers_match_their_json():
    """`python docs/tables.py --check`: every generated block equals what its JSON renders to."""
    spec = importlib.util.spec_from_file_location("doc_tables", ROOT / "docs" / "tables.py")
    assert spec and spec.loader
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    used = set()
    for path in tables.docs():
        text = path.read_text()
        new, stale = tables.render(text, path.name)
        assert not stale, f"stale: {stale}; run `python docs/tables.py`"
        used |= {m["name"] for m in tables.BLOCK.finditer(text)}
    assert used == set(tables.RENDERERS), f"renderers never used: {set(tables.RENDERERS) - used}"


def test_readme_fits_a_newcomer():
    """README.md: at most 150 lines, the two set-up commands, and working links to docs/."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    setup = [c.argv for b in blocks(ROOT / "README.md") for c in split_lines(b) if b.lang == "bash"]
    assert [a for a in setup if a[0] == "make"] == [["make", "repro"], ["make", "test"]]
    for p in DOCS:
        for link in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", p.read_text()):
            assert (p.parent / link).is_file(), f"{p.name}: broken link {link}"


def test_python_blocks_run():
    """The library snippets run as written, given a response array and a black-box function."""
    import numpy as np

    snippets = all_blocks("python")
    assert snippets
    for b in snippets:
        scope = {
            "responses": np.random.default_rng(0).random(32),
            "f": lambda idx: -((np.asarray(idx) - 8.0) ** 2).sum(axis=1),  # planted maximum at index 8
        }
        exec(compile(b.text, f"{b.doc}:{b.line}", "exec"), scope)  # the docs' own code
        assert "opt" in scope, f"{b.doc}:{b.line}: no optimizer made"
