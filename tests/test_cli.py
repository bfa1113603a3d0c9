"""`taskmoe eval` and `taskmoe chat` on the demo models, and their errors."""

from __future__ import annotations

import json
import subprocess
import sys

from server.cli import main

from conftest import DEMO_DENSE, DEMO_MOE, ROOT


def test_eval_prints_json_accuracy(capsys) -> None:
    assert main(["eval", str(DEMO_DENSE), "-n", "8", "--tasks", "upper,reverse", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["accuracy"]) == {"upper", "reverse"}
    assert all(0.0 <= v <= 1.0 for v in report["accuracy"].values())


def test_eval_table(capsys) -> None:
    assert main(["eval", str(DEMO_MOE), "-n", "4", "--tasks", "translate"]) == 0
    out = capsys.readouterr().out
    assert "translate" in out and "mean" in out


def test_chat_answers_one_prompt(capsys) -> None:
    assert main(["chat", "--model", str(DEMO_MOE), "Convert to upper case: good morning"]) == 0
    assert capsys.readouterr().out.strip() == "GOOD MORNING"


def test_bad_model_directory_is_a_one_line_error(tmp_path, capsys) -> None:
    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a model directory" in err and "Traceback" not in err


def test_unknown_task_is_a_clear_error(capsys) -> None:
    assert main(["eval", str(DEMO_MOE), "--tasks", "poetry"]) == 2
    assert "known tasks" in capsys.readouterr().err


def test_eval_runs_as_a_command_in_its_own_process() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "eval", str(DEMO_DENSE), "-n", "3", "--tasks", "sort", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "sort" in json.loads(done.stdout)["accuracy"]


def test_chat_reads_prompts_from_stdin() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "chat", "--model", str(DEMO_MOE)],
        input="Translate 'red cat' into Zorbish.\n\n",
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "vel mip"
