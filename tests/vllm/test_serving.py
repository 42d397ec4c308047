"""Serving promoted adapters through a real `vllm serve` (the CPU build), queried with the openai client.

One server for the switching tests (`loraplex serving`, following a ConfigMap folder as the kubelet
projects it); one for `loraplex serve RUN_DIR` on a finished run. Adapters are written by loraplex;
answers are compared with PEFT's greedy generation of the same checkpoint.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex_trainer.adapters import MultiLoRAModel
from loraplex_trainer.checkpoint import CheckpointState, save_checkpoint
from loraplex_trainer.model_host import load_base_model
from loraplex_trainer.multilora import AdapterConfig
from loraplex_trainer.optim import AdapterOptimizer, OptimizerConfig
from loraplex_trainer.serving import free_port
from tests.processes import checkout_env, loraplex

pytestmark = pytest.mark.vllm
PROMPT, TOKENS = "hello there", 8
SWITCH_LIMIT_S = 30.0


def _peft_greedy(model_dir: Path, adapter: Path | None) -> str:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.eval().generate(ids, max_new_tokens=TOKENS, do_sample=False)
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


@dataclass
class Server:
    process: subprocess.Popen[str]
    url: str
    client: openai.OpenAI

    def answer(self, model: str) -> str:
        completion = self.client.completions.create(
            model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0
        )
        return completion.choices[0].text

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def _start(command: list[str], log: Path) -> Server:
    port = int(command[command.index("--port") + 1])
    out = log.open("w")
    process = subprocess.Popen(command, env=checkout_env(), stdout=out, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            import urllib.request

            with urllib.request.urlopen(f"{url}/ready", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        raise AssertionError(f"not ready in 300 s: {log.read_text()[-3000:]}")
    return Server(process, url, openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0))


def _write_revisions(model_dir: Path, root: Path) -> dict[str, Path]:
    """Checkpoints as the trainer writes them (manifest and all): alpha at two steps, beta at one."""
    model = MultiLoRAModel(load_base_model(f"file://{model_dir}").model)
    folders = {}
    for name, config, steps in (
        ("alpha", AdapterConfig(rank=4, alpha=8.0), (1, 2)),
        ("beta", AdapterConfig(rank=8, alpha=8.0, target_modules=("q_proj", "v_proj")), (1,)),
    ):
        model.add_adapter(name, config)
        optimizer = AdapterOptimizer(model.adapter_parameters(name), OptimizerConfig(learning_rate=0.01))
        for step in steps:
            with torch.no_grad():
                for b in model.adapter_parameters(name)[1::2]:
                    b.normal_(std=1.0, generator=torch.Generator().manual_seed(100 * step + len(name)))
            folders[f"{name}@{step}"] = save_checkpoint(
                root / name / "checkpoints", model=model, adapter=name, optimizer=optimizer,
                state=CheckpointState(step=step, sampler={}, extra={}),
                base_model_name_or_path=f"file://{model_dir}", keep_last=5,
            )  # fmt: skip
    return folders


@dataclass
class Promoting:
    server: Server
    promoted: Path
    folders: dict[str, Path]
    expected: dict[str, str]

    def promote(self, name: str, revision: str) -> None:
        tmp = self.promoted / f".{name}.tmp"
        tmp.write_text(f"file://{self.folders[revision]}")
        tmp.rename(self.promoted / name)  # atomically, as the kubelet swaps a ConfigMap volume


@pytest.fixture(scope="module")
def promoting(vllm_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Promoting]:
    root = tmp_path_factory.mktemp("serving")
    folders = _write_revisions(vllm_model_dir, root / "storage")
    expected = {key: _peft_greedy(vllm_model_dir, folder) for key, folder in folders.items()}
    expected["base"] = _peft_greedy(vllm_model_dir, None)
    assert len(set(expected.values())) == len(expected), expected  # every revision answers differently
    promoted = root / "promoted"
    promoted.mkdir()
    state = Promoting(None, promoted, folders, expected)  # type: ignore[arg-type]
    state.promote("alpha", "alpha@1")
    state.promote("beta", "beta@1")
    command = loraplex(
        "serving", "--model-uri", f"file://{vllm_model_dir}", "--model-name", "tiny",
        "--promoted-dir", str(promoted), "--allow-file-uris", "--port", str(free_port()), "--interval", "0.5",
        "--max-loras", "2", "--max-lora-rank", "8", "--dtype", "float32",
        "--", "--max-model-len", "256", "--enforce-eager",
    )  # fmt: skip
    started = time.monotonic()
    state.server = _start(command, root / "serving.log")
    print(f"serving ready in {time.monotonic() - started:.1f} s")
    yield state
    state.server.stop()


def test_each_experiment_answers_with_its_promoted_checkpoint_and_the_base_with_the_base(
    promoting: Promoting,
) -> None:
    assert promoting.server.answer("alpha") == promoting.expected["alpha@1"]
    assert promoting.server.answer("beta") == promoting.expected["beta@1"]
    assert promoting.server.answer("tiny") == promoting.expected["base"]
    models = {m.id: m for m in promoting.server.client.models.list().data}
    assert set(models) == {"tiny", "alpha", "beta"}
    served = json.loads(urlread(f"{promoting.server.url}/loraplex/served"))["served"]
    assert served["alpha"]["revision"] == "step-00000001" and served["beta"]["uri"].endswith("step-00000001")


def urlread(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def test_unknown_and_unpromoted_names_are_404s_that_name_them(promoting: Promoting) -> None:
    for name in ("nope", "gamma"):
        with pytest.raises(openai.NotFoundError, match=f"The model `{name}` does not exist"):
            promoting.server.answer(name)
    # vLLM's own adapter endpoints are not reachable through the public port.
    with pytest.raises(openai.NotFoundError):
        promoting.server.client.post(
            "/load_lora_adapter", body={"lora_name": "x", "lora_path": "/"}, cast_to=dict
        )


def test_promotion_and_rollback_are_served_within_30_s_while_another_adapter_keeps_answering(
    promoting: Promoting,
) -> None:
    stop, answers, failures = threading.Event(), [], []

    def ask_beta() -> None:
        while not stop.is_set():
            try:
                answers.append(promoting.server.answer("beta"))
            except Exception as exc:  # every failure is collected and reported
                failures.append(repr(exc))

    neighbour = threading.Thread(target=ask_beta)
    neighbour.start()
    latencies = []
    try:
        for switch in range(10):
            revision = ("alpha@2", "alpha@1")[switch % 2]  # promote, roll back, promote, ...
            promoting.promote("alpha", revision)
            changed = time.monotonic()
            while promoting.server.answer("alpha") != promoting.expected[revision]:
                assert time.monotonic() - changed < SWITCH_LIMIT_S, f"switch {switch} to {revision}"
                time.sleep(0.1)
            latencies.append(time.monotonic() - changed)
    finally:
        stop.set()
        neighbour.join()
    print(f"promotion to served: median {statistics.median(latencies):.2f} s, max {max(latencies):.2f} s")
    assert not failures, failures[:3]
    assert answers and set(answers) == {promoting.expected["beta@1"]}


def test_an_experiment_leaving_the_map_is_no_longer_served(promoting: Promoting) -> None:
    (promoting.promoted / "beta").unlink()
    deadline = time.monotonic() + SWITCH_LIMIT_S
    while True:
        try:
            promoting.server.answer("beta")
        except openai.NotFoundError:
            break
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert promoting.server.answer("alpha") in (promoting.expected["alpha@1"], promoting.expected["alpha@2"])


def test_loraplex_serve_answers_with_a_finished_runs_final_adapters(
    vllm_model_dir: Path, tmp_path: Path
) -> None:
    pool = {
        "apiVersion": "loraplex.dev/v1alpha1", "kind": "SharedBasePool", "metadata": {"name": "tiny"},
        "spec": {"model": {"name": "tiny-base", "uri": f"file://{vllm_model_dir}"}, "trainer": {"rolloutEngine": "torch"}},
    }  # fmt: skip
    experiment = {
        "apiVersion": "loraplex.dev/v1alpha1", "kind": "LoRAExperiment", "metadata": {"name": "quick"},
        "spec": {
            "poolRef": {"name": "tiny"}, "lora": {"rank": 4, "alpha": 8},
            "dataset": {"inline": [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(6)], "chatTemplate": False},
            "reward": {"builtin": {"name": "regex_match", "args": {"pattern": "[0-9]"}}},
            "algorithm": {"groupSize": 2, "promptsPerStep": 2, "maxSteps": 2, "maxNewTokens": 4},
            "optimizer": {"learningRate": 0.5},
        },
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump_all([pool, experiment]))
    run = tmp_path / "run"
    trained = subprocess.run(
        loraplex("train", str(tmp_path / "run.yaml"), "--output", str(run), "--no-live"),
        env=checkout_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    command = loraplex("serve", str(run), "--port", str(free_port()), "--dtype", "float32",
                       "--", "--max-model-len", "256", "--enforce-eager")  # fmt: skip
    server = _start(command, tmp_path / "serve.log")
    try:
        assert server.answer("quick") == _peft_greedy(vllm_model_dir, run / "quick" / "adapter")
        assert server.answer("tiny-base") == _peft_greedy(vllm_model_dir, None)
    finally:
        server.stop()
    printed = (tmp_path / "serve.log").read_text()
    assert "serving on http://127.0.0.1:" in printed and "quick (final)" in printed
