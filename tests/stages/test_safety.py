"""Loading executes nothing an artifact or a downloaded checkpoint names (issue #11)."""

from __future__ import annotations

import http.server
import json
import os
import pickle
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

from models.encoders import LogMelEncoder
from models.rvq import ResidualVQ
from stages.artifacts import ArtifactModule, UnsafeArtifactError, build_module, load_artifact, promote
from stages.safety import checkpoint_weights_only, inside_artifact, resolve_class_path

REPO = Path(__file__).resolve().parents[2]
RVQ_ARGS = {"dim": 4, "num_quantizers": 2, "codebook_size": 3, "kmeans_init": False}


def _artifact(root: Path, modules: dict, name: str = "art") -> Path:
    """A version folder whose ``config.json`` says ``modules`` (what a downloaded artifact may say)."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"stage": "stage1", "version": 1, "modules": modules, "info": {}}))
    return folder


def _genuine(tmp_path: Path) -> Path:
    rvq = ResidualVQ(**RVQ_ARGS, seed=3)
    return promote(stage="stage1", artifacts_dir=tmp_path / "artifacts", metrics={"val/cosine": 1.0},
                   modules={"quantizer": ArtifactModule("models.rvq.ResidualVQ", RVQ_ARGS, rvq.state_dict())}).path  # fmt: skip


def _payloads(marker: Path) -> dict[str, dict]:
    """Specs that would each create ``marker`` if they ran."""
    return {
        "os.system": {"class_path": "os.system", "init_args": {"command": f"touch {marker}"}},
        "subprocess.getoutput": {"class_path": "subprocess.getoutput", "init_args": {"cmd": f"touch {marker}"}},
        "subprocess.Popen": {"class_path": "subprocess.Popen", "init_args": {"args": ["touch", str(marker)]}},
        "builtins.eval": {"class_path": "builtins.eval", "init_args": {"source": f"open({str(marker)!r}, 'w')"}},
        "builtins.exec": {"class_path": "builtins.exec", "init_args": {"source": f"open({str(marker)!r}, 'w')"}},
        "builtins.open": {"class_path": "builtins.open", "init_args": {"file": str(marker), "mode": "w"}},
        # Project modules re-export foreign objects: reaching them through a project path is refused too.
        "models.rvq.torch.save": {"class_path": "models.rvq.torch.save", "init_args": {"obj": 1, "f": str(marker)}},
        "models.rvq.__builtins__": {"class_path": "models.rvq.__builtins__.open", "init_args": {"file": str(marker), "mode": "w"}},
        "pathlib.Path.touch": {"class_path": "pathlib.Path", "init_args": {"_": str(marker)}},
    }


@pytest.mark.parametrize("payload", list(_payloads(Path("m"))))
def test_a_hostile_class_path_is_refused_and_never_runs(tmp_path, payload):
    marker = tmp_path / "MARKER"
    folder = _artifact(tmp_path, {"quantizer": _payloads(marker)[payload]})
    with pytest.raises(UnsafeArtifactError, match="quantizer"):
        load_artifact(folder)
    assert not marker.exists()


@pytest.mark.parametrize("payload", list(_payloads(Path("m"))))
def test_a_hostile_spec_nested_in_init_args_is_refused_before_anything_is_built(tmp_path, payload, monkeypatch):
    marker = tmp_path / "MARKER"
    built = []
    monkeypatch.setattr(ResidualVQ, "__init__", lambda self, **kw: built.append(kw))
    monkeypatch.setattr(LogMelEncoder, "__init__", lambda self, **kw: built.append(kw))
    sibling = {"class_path": "models.encoders.LogMelEncoder", "init_args": {}}  # fine, but not built either
    nested = [
        {**RVQ_ARGS, "dim": _payloads(marker)[payload]},
        {**RVQ_ARGS, "extra": [{"deep": _payloads(marker)[payload]}]},
        {**RVQ_ARGS, "a": sibling, "b": _payloads(marker)[payload]},
    ]
    for i, init_args in enumerate(nested):
        folder = _artifact(tmp_path / str(i), {"quantizer": {"class_path": "models.rvq.ResidualVQ", "init_args": init_args}})
        with pytest.raises(UnsafeArtifactError, match=r"quantizer'\.(dim|extra\[0\]\.deep|b)"):
            load_artifact(folder)
    assert not marker.exists() and built == []


def test_a_module_outside_the_project_is_never_imported(tmp_path, monkeypatch):
    marker = tmp_path / "IMPORTED"
    pkg = tmp_path / "site" / "evilpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Evil(__import__('torch').nn.Module): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for class_path in ("evilpkg.Evil", "evilpkg.Evil.load"):
        folder = _artifact(tmp_path / class_path, {"quantizer": {"class_path": class_path, "init_args": {}}})
        with pytest.raises(UnsafeArtifactError, match="outside this project"):
            load_artifact(folder)
    assert "evilpkg" not in sys.modules and not marker.exists()


def test_a_package_shadowing_models_is_never_imported(tmp_path):
    """Another ``models`` first on ``sys.path`` is found, not imported, and refused."""
    marker = tmp_path / "IMPORTED"
    (tmp_path / "site" / "models").mkdir(parents=True)
    (tmp_path / "site" / "models" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (tmp_path / "site" / "models" / "rvq.py").write_text("class ResidualVQ: pass\n")
    folder = _artifact(tmp_path, {"quantizer": {"class_path": "models.rvq.ResidualVQ", "init_args": {}}})
    script = (
        f"import sys; sys.path[:0] = [{str(tmp_path / 'site')!r}, {str(REPO)!r}]\n"
        "from stages.artifacts import load_artifact, UnsafeArtifactError\n"
        f"try:\n    load_artifact({str(folder)!r})\nexcept UnsafeArtifactError as e:\n    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert "refused:" in out.stdout and "does not resolve to this project" in out.stdout, out.stderr
    assert not marker.exists()


def test_a_models_folder_in_the_working_directory_neither_breaks_loading_nor_runs(tmp_path):
    """``lightning fit`` run where a ``models/`` folder of weights lies (the real-config tests do so):
    ``models`` becomes a namespace package there; a genuine artifact still loads, and a file of that
    folder that shadows a project module is refused before it runs."""
    probe = subprocess.run([sys.executable, "-c", "import stages"], capture_output=True, cwd=tmp_path)
    if probe.returncode:
        pytest.skip("the project is not installed (scripts/setup.sh installs it)")
    marker = tmp_path / "RAN"
    (tmp_path / "models" / "weights").mkdir(parents=True)
    (tmp_path / "models" / "ctc.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass X: pass\n")
    init = {"dim": 8, "num_quantizers": 2, "codebook_size": 4, "kmeans_init": False}
    script = (
        "import sys, json\n"
        "from stages.artifacts import ArtifactModule, promote, load_artifact, UnsafeArtifactError\n"
        "from models.rvq import ResidualVQ\n"
        f"init = {init!r}\n"
        "r = promote(stage='stage1', modules={'quantizer': ArtifactModule('models.rvq.ResidualVQ', init,"
        " ResidualVQ(**init).state_dict())}, metrics={}, artifacts_dir='arts')\n"
        "print('loaded:', type(load_artifact(r.path)['modules']['quantizer']).__name__)\n"
        "config = json.loads((r.path / 'config.json').read_text())\n"
        "config['modules']['quantizer']['class_path'] = 'models.ctc.X'\n"
        "(r.path / 'config.json').write_text(json.dumps(config))\n"
        "try:\n    load_artifact(r.path)\nexcept UnsafeArtifactError as e:\n    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert "loaded: ResidualVQ" in out.stdout, out.stderr[-3000:]
    assert "refused:" in out.stdout and "does not resolve to this project" in out.stdout, out.stdout + out.stderr[-3000:]
    assert not marker.exists()


@pytest.mark.parametrize(
    ("class_path", "message"),
    [
        ("models..rvq.ResidualVQ", "public identifiers"),
        (".models.rvq.ResidualVQ", "public identifiers"),
        ("models.rvq.ResidualVQ.", "public identifiers"),
        ("models/rvq.ResidualVQ", "public identifiers"),
        ("models.rvq._private", "public identifiers"),
        ("models.rvq.ResidualVQ.__init__", "public identifiers"),
        ("ResidualVQ", "public identifiers"),
        (["models.rvq.ResidualVQ"], "must be a string"),
        ("models.nosuchmodule.X", "models.nosuchmodule is not a class"),
        ("models.rvq.nosuchclass", "models.rvq.nosuchclass is not a class"),
        ("torch.nn.Linear", "outside this project"),
        ("datamodules.speech.SpeechDataModule", "outside this project"),
        ("stages.stage1.RVQStage", "outside this project"),
        ("models.encoders.LogMelEncoder", "is a LogMelEncoder, not a models.rvq.ResidualVQ"),  # wrong kind
        ("models.encoders.build_encoder", "not a class defined in this project"),  # a project function
        ("models.speech_lm.AutoModelForCausalLM", "not a class defined in this project"),  # re-exported
        ("models.rvq.torch", "not a class defined in this project"),  # an imported module
        ("models.rvq.RVQOutput", "is a RVQOutput, not a"),  # a project class, not an nn.Module
        ("models.rvq.ResidualVQ.load_state_dict", "not a classmethod of a project class"),
        ("models.rvq.ResidualVQ.encode", "not a classmethod of a project class"),
        ("models.rvq.ResidualVQ.a.b", "module.Class or module.Class.classmethod"),
    ],
)
def test_what_a_class_path_may_name(tmp_path, class_path, message):
    folder = _artifact(tmp_path, {"quantizer": {"class_path": class_path, "init_args": RVQ_ARGS}})
    with pytest.raises(UnsafeArtifactError, match=message.replace(".", r"\.")):
        load_artifact(folder, expect={"quantizer": ResidualVQ})


def test_each_module_must_be_the_kind_its_name_expects(tmp_path):
    logmel = {"class_path": "models.encoders.LogMelEncoder", "init_args": {}}
    assert isinstance(load_artifact(_artifact(tmp_path / "a", {"encoder": logmel}))["modules"]["encoder"], LogMelEncoder)
    with pytest.raises(UnsafeArtifactError, match="not a models.quantizer.SemanticQuantizer"):  # the default table
        load_artifact(_artifact(tmp_path / "b", {"quantizer": logmel}))
    with pytest.raises(UnsafeArtifactError, match="no expected kind"):
        load_artifact(_artifact(tmp_path / "c", {"head": logmel}))
    # The stage-2 classmethod names a project class; it must still be the kind expected.
    lm = {"class_path": "models.speech_lm.SpeechLM.load", "init_args": {"directory": "@artifact/lm"}}
    with pytest.raises(UnsafeArtifactError, match="is a SpeechLM, not a models.quantizer.SemanticQuantizer"):
        load_artifact(_artifact(tmp_path / "d", {"quantizer": lm}))


def test_a_project_classmethod_must_return_the_expected_kind(monkeypatch):
    monkeypatch.setattr(ResidualVQ, "rogue", classmethod(lambda cls: "not a module"), raising=False)
    with pytest.raises(UnsafeArtifactError, match="returned a str"):
        build_module({"class_path": "models.rvq.ResidualVQ.rogue", "init_args": {}}, expected=ResidualVQ)


def test_files_an_artifact_names_stay_inside_it(tmp_path):
    genuine = _genuine(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "quantizer.safetensors").write_bytes((genuine / "quantizer.safetensors").read_bytes())
    config = json.loads((genuine / "config.json").read_text())
    entry = config["modules"]["quantizer"]
    lm = {"class_path": "models.speech_lm.SpeechLM.load"}
    (genuine / "escape").symlink_to(outside)  # a link inside the folder that points out of it
    cases = {
        "weights ../": ({"quantizer": {**entry, "weights": "../../../outside/quantizer.safetensors"}}, "leaves the artifact"),
        "weights abs": ({"quantizer": {**entry, "weights": str(outside / "quantizer.safetensors")}}, "relative path"),
        "weights link": ({"quantizer": {**entry, "weights": "escape/quantizer.safetensors"}}, "leaves the artifact"),
        "folder ../": ({"quantizer": {**entry, "folder": "../v0"}}, "leaves the artifact"),
        "@artifact/../": ({"lm": {**lm, "init_args": {"directory": "@artifact/../../../outside"}}}, "leaves the artifact"),
        "@artifact link": ({"lm": {**lm, "init_args": {"directory": "@artifact/escape"}}}, "leaves the artifact"),
        "@artifact//": ({"lm": {**lm, "init_args": {"directory": "@artifact//etc"}}}, "relative path"),
    }
    for case, (modules, message) in cases.items():
        (genuine / "config.json").write_text(json.dumps({**config, "modules": modules}))
        with pytest.raises(UnsafeArtifactError, match=message):
            load_artifact(genuine)
        assert case  # which case failed shows in the traceback's locals
    assert inside_artifact(genuine, "quantizer.safetensors", what="x") == (genuine / "quantizer.safetensors").resolve()


def test_a_genuine_artifact_still_loads(tmp_path, monkeypatch):
    genuine = _genuine(tmp_path)
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load"))
    loaded = load_artifact(genuine)["modules"]["quantizer"]
    assert torch.equal(loaded.codebooks, ResidualVQ(**RVQ_ARGS, seed=3).codebooks)
    assert resolve_class_path("models.speech_lm.SpeechLM.load", torch.nn.Module, what="x").__self__.__name__ == "SpeechLM"


def test_promotion_refuses_what_loading_would_refuse(tmp_path):
    rvq = ResidualVQ(**RVQ_ARGS)
    bad = {
        "foreign class": {"quantizer": ArtifactModule("torch.nn.Linear", {"in_features": 4, "out_features": 3})},
        "wrong kind": {"quantizer": ArtifactModule("models.encoders.LogMelEncoder", {})},
        "unknown name": {"head": ArtifactModule("models.rvq.ResidualVQ", RVQ_ARGS, rvq.state_dict())},
        "nested": {"quantizer": ArtifactModule("models.rvq.ResidualVQ", {"x": {"class_path": "os.system"}})},
    }
    for case, modules in bad.items():
        with pytest.raises(UnsafeArtifactError):
            promote(stage="stage1", modules=modules, metrics={}, artifacts_dir=tmp_path)
        assert not (tmp_path / "stage1").exists(), case


def test_infer_refuses_a_merged_model_outside_the_artifact(tmp_path):
    from stages.infer import main as infer

    folder = _artifact(tmp_path, {"llm": {"class_path": "models.spoken_llm.SpokenLLM", "init_args": {}}})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "info": {"merged": "../../elsewhere"}}))
    import numpy as np
    import soundfile as sf

    wav = tmp_path / "question.wav"  # inputs are read (and checked) before the artifact is loaded
    sf.write(wav, np.zeros(1600, dtype=np.float32), 16000)
    with pytest.raises(UnsafeArtifactError, match="info.merged"):
        infer(["--artifact", str(folder), "--audio", str(wav)])


# ---- Lightning checkpoints fetched by URL ---------------------------------------------------------


class _Payload:
    """Unpickling this creates a file: what a hostile checkpoint could do with any call."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A hostile ``.ckpt`` served over HTTP on localhost, and the file its unpickling would create."""
    marker = tmp_path / "PWNED"
    site = tmp_path / "site"
    site.mkdir()
    torch.save({"state_dict": {}, "evil": _Payload(str(marker))}, site / "evil.ckpt")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # where torch.hub caches downloads

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(site), **k)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/evil.ckpt", marker
    server.shutdown()


def test_checkpoint_weights_only_rules():
    for url in ("https://example.org/a.ckpt", "http://h/a.ckpt", "s3://bucket/a.ckpt", "hf://org/repo/a.ckpt"):
        assert checkpoint_weights_only(url, None) is True and checkpoint_weights_only(url, True) is True
        with pytest.raises(ValueError, match="refusing weights_only=False"):
            checkpoint_weights_only(url, False)
    for local in ("runs/last.ckpt", Path("/abs/last.ckpt"), None, "last"):
        assert checkpoint_weights_only(local, None) is None and checkpoint_weights_only(local, False) is False


def test_a_downloaded_checkpoint_is_never_unpickled(served):
    from lightning.fabric.utilities.cloud_io import _load

    url, marker = served
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        _load(url, map_location="cpu", weights_only=checkpoint_weights_only(url, None))
    assert not marker.exists()
    # What Lightning does on its own with a URL: the pickle runs (the reason for the rule above).
    _load(url, map_location="cpu", weights_only=None)
    assert marker.exists()


def test_the_cli_lines_for_ckpt_urls(served, tmp_path):
    """The lines proposed for ``SpeechlessCLI._prepare_subcommand_kwargs``, run through a real CLI."""
    from stages.cli import SpeechlessCLI

    class Patched(SpeechlessCLI):
        def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
            kwargs = super()._prepare_subcommand_kwargs(subcommand)
            if "ckpt_path" in kwargs:  # a downloaded checkpoint is never unpickled
                kwargs["weights_only"] = checkpoint_weights_only(kwargs["ckpt_path"], kwargs.get("weights_only"))
            return kwargs

    url, marker = served
    args = ["validate", "--model", "lightning.pytorch.demos.boring_classes.BoringModel", "--ckpt_path", url,
            "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            Patched(args=args)
        with pytest.raises(ValueError, match="refusing weights_only=False"):
            Patched(args=[*args, "--weights_only", "false"])
    assert not marker.exists()


def test_promote_command_never_unpickles_a_url(monkeypatch):
    """``speechless-promote --ckpt_path URL`` validates with ``weights_only=True``."""
    from stages.cli import promote_main
    from stages.promote import Promote

    seen = {}

    class FakeTrainer:
        callbacks = [Promote(stage="stage1")]

        def validate(self, model, **kw):
            seen.update(kw)
            raise SystemExit(0)

    class FakeCLI:
        def __init__(self, **_):
            self.trainer, self.model, self.datamodule = FakeTrainer(), None, None

    monkeypatch.setattr("stages.cli.SpeechlessCLI", FakeCLI)
    url = "https://example.org/run/averaged.ckpt"
    with pytest.raises(SystemExit):
        promote_main(["--config", os.devnull, "--ckpt_path", url])
    assert seen["ckpt_path"] == url and seen["weights_only"] is True
