"""No checkpoint file can run code (docs/reliability.md): payloads planted in every kind of file the project reads,
loaded through every documented entry point, are refused before anything is unpickled, with one line naming the
file and the global; real checkpoints still load; --trust-checkpoint (trust=True) is the only way a payload runs.

Every payload would `touch` a marker file; each test asserts the marker does not exist. The payloads are shown to be
live once each (test_a_payload_is_refused_unless_trusted_and_then_it_runs), so a missing marker means refused.
"""

import importlib.util
import io
import json
import logging
import os
import pickle
import random
import shutil

import numpy as np
import pytest
import torch

from cmae_ds.config import ModelConfig, load_task_config
from cmae_ds.engine.checkpoints import store as checkpointing
from cmae_ds.modelfiles.classifier import load_classifier, save_classifier_file
from cmae_ds.modelfiles.formats import CheckpointError, UnsafeCheckpoint, load_official_cmae
from cmae_ds.modelfiles.safe_load import UNRESOLVED, load_checkpoint_file, pickle_globals, scan_folder
from cmae_ds.models import CMAE, ViTClassifier
from cmae_ds.tasks.finetune import build_model

from engine_helpers import ROOT, TINY, run_python, tail, write_ds
from finetune_helpers import write_class_folder
from helpers import fixture_config, save_official_like

SYSTEM = f'{os.system.__module__}.system'  # posix.system on Linux


class Plain:
    """A __reduce__ that runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


class Nested(Plain):
    """The same, inside bytes that torch.storage._load_from_bytes hands to torch.load(weights_only=False)."""

    def __reduce__(self):
        inner = io.BytesIO()
        torch.save(Plain(self.marker), inner)
        return torch.storage._load_from_bytes, (inner.getvalue(),)


class SubclassRebuild(Plain):
    """A tensor subclass's rebuild (allowed: ZeRO-3 writes them), whose first argument is the function it calls."""

    def __reduce__(self):
        return torch._tensor._rebuild_from_type_v2, (os.system, torch.Tensor, (f'touch {self.marker}',), {})


PAYLOADS = {
    'plain': (Plain, SYSTEM),
    'nested': (Nested, 'torch.storage._load_from_bytes'),
    'subclass': (SubclassRebuild, SYSTEM),
}
MODEL = ModelConfig(size='debug', img_size=32, patch_size=8, decoder_depth=1)
MODEL_ARGS = ['model.size=debug', 'model.img_size=32', 'model.patch_size=8', 'model.decoder_depth=1']


@pytest.fixture
def marker(tmp_path):
    return tmp_path / 'pwned'


def assert_refused(text: str, path, name: str, marker) -> None:
    assert str(path) in text and name in text, text
    assert 'Traceback' not in text
    assert not marker.exists()


def launch(name: str):
    """A launch script as a module, to call its main() in this process."""
    spec = importlib.util.spec_from_file_location(f'launch_{name}', ROOT / 'launch' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def our_model_file(path, payload=None):
    """model.pt as pretraining writes it; the payload replaces one of the encoder's tensors."""
    state = CMAE(MODEL).state_dict()
    if payload is not None:
        state['encoder.cls_token'] = payload
    torch.save({'state_dict': state, 'model_config': MODEL.__dict__}, path)
    return path


def first_with(obj, key):
    """The first dict inside obj (nested dicts and lists) that holds `key`."""
    if isinstance(obj, dict):
        if key in obj:
            return obj
        obj = list(obj.values())
    for item in obj if isinstance(obj, (list, tuple)) else ():
        found = first_with(item, key)
        if found is not None:
            return found
    return None


# ---- the scanner ----------------------------------------------------------------------------------------------


def test_scanner_resolves_globals_however_the_pickle_names_them(marker):
    for protocol in (0, 2, 4, 5):  # GLOBAL; STACK_GLOBAL with literal strings, then with the memoized callable
        assert pickle_globals(io.BytesIO(pickle.dumps([Plain(marker), Plain(marker)], protocol=protocol))) == {SYSTEM}
    # operands from the memo after the literals were popped; then two literals hidden behind MARK / POP_MARK
    from_memo = b'\x80\x04\x8c\x05posix\x94\x8c\x06system\x9400h\x00h\x01\x93.'
    hidden = b'\x80\x04\x8c\x05posix\x8c\x06system(1\x93.'
    assert pickle.loads(from_memo) is os.system and pickle.loads(hidden) is os.system
    assert pickle_globals(io.BytesIO(from_memo)) == {'posix.system'}
    assert pickle_globals(io.BytesIO(hidden)) == {UNRESOLVED}
    assert pickle_globals(io.BytesIO(b'\x80\x02\x82\xf0.')) == {'<copyreg extension code 240>'}


@pytest.mark.parametrize('form', ['zip', 'legacy', 'bare pickle'])
@pytest.mark.parametrize('kind', PAYLOADS)
def test_a_payload_is_refused_unless_trusted_and_then_it_runs(tmp_path, marker, caplog, kind, form):
    cls, name = PAYLOADS[kind]
    path, obj = tmp_path / 'model.pt', {'state_dict': {'w': torch.zeros(2)}, 'meta': cls(marker)}
    if form == 'bare pickle':  # torch.load(weights_only=False) unpickles it as the legacy format's magic number
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=form == 'zip')
    with pytest.raises(UnsafeCheckpoint) as err:
        load_checkpoint_file(path)
    assert_refused(str(err.value), path, name, marker)
    assert '--trust-checkpoint' in str(err.value) and '\n' not in str(err.value)
    with caplog.at_level(logging.WARNING, logger='cmae_ds.modelfiles.safe_load'):
        try:
            load_checkpoint_file(path, trust=True)
        except Exception:  # the subclass payload fails after it ran: os.system returns an int, not a tensor
            pass
    assert marker.exists()  # the payload is live: only the check stood between the file and the shell
    assert str(path) in caplog.text and 'without the safety check' in caplog.text


def test_unreadable_and_torchscript_files_are_checkpoint_errors(tmp_path):
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'PK\x03\x04 not really a zip')
    with pytest.raises(CheckpointError, match='bad.pt'):
        load_checkpoint_file(bad)
    script = tmp_path / 'script.pt'
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), script)
    with pytest.raises(CheckpointError, match='TorchScript'):
        load_checkpoint_file(script)


# ---- real files still load ------------------------------------------------------------------------------------


def test_the_official_parity_fixture_and_our_files_load(fixture_a, tmp_path):
    from conftest import FIXTURE_A

    model = load_official_cmae(FIXTURE_A, fixture_config(fixture_a))
    assert torch.equal(model.encoder.cls_token, fixture_a['state_dict']['backbone.cls_token'])
    ours = our_model_file(tmp_path / 'model.pt')
    assert load_checkpoint_file(ours)['state_dict'].keys() == CMAE(MODEL).state_dict().keys()


def draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.standard_normal(), random.random()


def test_rank_state_loads_weights_only_and_restores_every_stream_exactly(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # leaves numpy's cached second gaussian in the state
    path = tmp_path / 'rank_state_00000.pt'
    torch.save(checkpointing.rng_state(), path)
    expected = draws()
    draws()
    checkpointing.set_rng_state(torch.load(path, weights_only=True))
    assert draws() == expected
    # a rank state written before this form (numpy's tuple with an array) still resumes
    old = dict(checkpointing.rng_state(), numpy=np.random.get_state())
    torch.save(old, path)
    expected = draws()
    checkpointing.set_rng_state(load_checkpoint_file(path))
    assert draws() == expected


# ---- entry points, in this process ----------------------------------------------------------------------------


@pytest.mark.parametrize('kind', PAYLOADS)
@pytest.mark.parametrize('verb', ['official-to-ours', 'extract-encoder', 'to-timm'])
def test_convert_refuses_a_planted_official_checkpoint(fixture_a, tmp_path, marker, capsys, verb, kind):
    cls, name = PAYLOADS[kind]
    src, out = tmp_path / 'official.pth', tmp_path / 'out.pth'
    save_official_like(src, fixture_a['state_dict'], hook=cls(marker))
    model_args = [f'model.{k}={v}' for k, v in fixture_a['config'].items() if k not in ('batch', 'num_classes')]
    assert launch('convert_checkpoint').main([verb, str(src), str(out), *model_args]) == 2
    assert_refused(capsys.readouterr().err, src, name, marker)
    assert not out.exists()


@pytest.mark.parametrize('verb', ['extract-encoder', 'to-timm'])
def test_convert_refuses_our_planted_model_file(tmp_path, marker, capsys, verb):
    src = our_model_file(tmp_path / 'model.pt', Nested(marker))
    assert launch('convert_checkpoint').main([verb, str(src), str(tmp_path / 'out.pth'), *MODEL_ARGS]) == 2
    assert_refused(capsys.readouterr().err, src, 'torch.storage._load_from_bytes', marker)


def test_trust_checkpoint_loads_a_file_the_user_vouches_for_and_says_so(tmp_path, marker, capsys, caplog):
    src = tmp_path / 'model.pt'
    torch.save({'state_dict': CMAE(MODEL).state_dict(), 'meta': Plain(marker)}, src)
    with caplog.at_level(logging.WARNING, logger='cmae_ds.modelfiles.safe_load'):
        rc = launch('convert_checkpoint').main(
            ['--trust-checkpoint', 'extract-encoder', str(src), str(tmp_path / 'encoder.pth'), *MODEL_ARGS]
        )
    assert rc == 0 and marker.exists()
    assert f'{src}: loaded without the safety check' in caplog.text


def test_knn_refuses_a_planted_model_file(tmp_path, marker, capsys):
    src = our_model_file(tmp_path / 'model.pt', SubclassRebuild(marker))
    assert launch('knn').main([str(src), *MODEL_ARGS]) == 2
    assert_refused(capsys.readouterr().err, src, SYSTEM, marker)


@pytest.mark.parametrize('task,config', [('finetune', 'finetune_debug'), ('linprobe', 'linprobe_vit_base')])
def test_finetune_and_probe_refuse_a_planted_pretrained_file(tmp_path, marker, task, config):
    """What launch/finetune.py and launch/linear_probe.py build from `pretrained=` (their CLI: the slow test)."""
    src = our_model_file(tmp_path / 'model.pt', Plain(marker))
    cfg = load_task_config(task, config, [*MODEL_ARGS, f'{task}.pretrained={tmp_path}'])  # the run folder
    with pytest.raises(UnsafeCheckpoint) as err:
        build_model(cfg)
    assert_refused(str(err.value), src, SYSTEM, marker)


def test_evaluation_refuses_planted_classifier_files(tmp_path, marker):
    """Our fine-tuned model file (payload in its metadata) and an official fine-tuned .pth (in its weights)."""
    ours = save_classifier_file(
        tmp_path / 'model_best.pt',
        ViTClassifier(MODEL, 3).state_dict(),
        kind='finetune',
        model_cfg=MODEL,
        num_classes=3,
        img_size=32,
        extra={'epoch': Nested(marker)},
    )
    official = tmp_path / 'official_fine.pth'
    state = {f'backbone.{k}': v for k, v in CMAE(MODEL).encoder.state_dict().items()}
    state['head.head.weight'], state['head.head.bias'] = SubclassRebuild(marker), torch.zeros(3)
    save_official_like(official, state)
    for path, name in ((tmp_path, 'torch.storage._load_from_bytes'), (official, SYSTEM)):
        with pytest.raises(UnsafeCheckpoint) as err:
            load_classifier(path, MODEL)
        assert_refused(str(err.value), ours if path == tmp_path else official, name, marker)


def test_every_file_of_a_deepspeed_tag_is_scanned_whatever_its_name(tmp_path, marker):
    """Universal checkpoints: DeepSpeed reads zero/<param>/*.pt with its own torch.load, not through the engine."""
    tag = tmp_path / 'step_00000002'
    (tag / 'zero' / 'encoder.cls_token').mkdir(parents=True)
    torch.save({'param': torch.zeros(3)}, tag / 'zero' / 'encoder.cls_token' / 'fp32.pt')
    (tag / 'complete.json').write_text('{}')
    assert [p.name for p in scan_folder(tag)] == ['fp32.pt']
    planted = tag / 'zero' / 'encoder.cls_token' / 'exp_avg'  # no .pt: found by its content
    torch.save({'param': Plain(marker)}, planted)
    with pytest.raises(UnsafeCheckpoint) as err:
        checkpointing.load(None, tmp_path, tag.name)  # refused before the engine is touched
    assert_refused(str(err.value), planted, SYSTEM, marker)


# ---- pretraining resume, the CLIs: real DeepSpeed runs in subprocesses ----------------------------------------


@pytest.fixture
def pretrained(pretrained_run):
    """The session's tiny ZeRO-1 pretraining run (tests/conftest.py: model and optimizer states in separate files);
    each test copies it before planting anything."""
    return pretrained_run


def resume(s, run, *extra):
    return run_python(
        [
            'launch/pretrain.py',
            '--deepspeed_config',
            s['ds'],
            *TINY,
            'train.max_steps=1',
            'train.save_every_steps=0',
            f'train.output_dir={run}',
            *extra,
        ]
    )


def plant(path, where, payload):
    obj = torch.load(path, weights_only=False)  # a file this test wrote a moment ago
    where(obj, payload)
    torch.save(obj, path)


PLANTS = {  # file of the step_00000002 tag -> where the payload goes
    'rank_state_00000.pt': lambda obj, p: obj.update(rng=p),
    'mp_rank_00_model_states.pt': lambda obj, p: obj['module'].update({'encoder.cls_token': p}),
    'zero_pp_rank_0_mp_rank_00_optim_states.pt': lambda obj, p: first_with(obj, 'exp_avg').update(exp_avg=p),
}


def rewrite_manifest(tag_dir):
    """Whoever can plant a file in a checkpoint can rewrite its marker too: the file list then vouches for the planted
    file, and the scan alone must refuse it (without this, the size check finds the change first)."""
    from cmae_ds.engine.checkpoints import verify as checkpoint_verify

    path = tag_dir / 'complete.json'
    marker = json.loads(path.read_text())
    marker['files'] = checkpoint_verify.checksums(tag_dir, [checkpoint_verify.sizes(tag_dir)])
    path.write_text(json.dumps(marker))


@pytest.mark.slow
@pytest.mark.parametrize('name', PLANTS)
def test_resume_refuses_a_planted_checkpoint_file(pretrained, tmp_path, marker, name):
    run = tmp_path / 'run'
    shutil.copytree(pretrained['run'], run)
    planted = run / 'checkpoints' / 'step_00000002' / name
    plant(planted, PLANTS[name], Plain(marker))
    rewrite_manifest(planted.parent)
    proc = resume(pretrained, run, '--resume', 'auto')
    assert proc.returncode == 2, tail(proc)
    assert_refused(proc.stderr, planted, SYSTEM, marker)


@pytest.mark.slow
def test_real_checkpoints_resume_and_deepspeed_reads_them_weights_only(pretrained, tmp_path, marker):
    """A clean resume through the checked DeepSpeed loads (ZeRO-1: loss scaler, stage enum, fragment addresses),
    and DeepSpeed's own model-state reader given a planted file through the same checked engine."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.state_dict_factory import SDLoaderFactory

    from cmae_ds.modelfiles.safe_load import _CheckedCheckpointEngine

    run = tmp_path / 'run'
    shutil.copytree(pretrained['run'], run)
    proc = resume(pretrained, run)
    assert proc.returncode == 0, tail(proc)
    assert 'resumed from step_00000002' in proc.stdout + proc.stderr
    checked = _CheckedCheckpointEngine(TorchCheckpointEngine(), trust=False)
    states = pretrained['tag'] / 'mp_rank_00_model_states.pt'
    _, sd, _ = SDLoaderFactory.get_sd_loader([str(states)], checkpoint_engine=checked).load(1, 0)
    assert 'encoder.cls_token' in sd['module']
    planted = tmp_path / 'mp_rank_00_model_states.pt'
    shutil.copy(states, planted)
    plant(planted, PLANTS['mp_rank_00_model_states.pt'], Nested(marker))
    with pytest.raises(UnsafeCheckpoint) as err:
        SDLoaderFactory.get_sd_loader([str(planted)], checkpoint_engine=checked).load(1, 0)
    assert_refused(str(err.value), planted, 'torch.storage._load_from_bytes', marker)


@pytest.mark.slow
def test_the_clis_refuse_planted_files(tmp_path, marker):
    """launch/finetune.py pretrained=, launch/linear_probe.py pretrained= and launch/evaluate.py, end to end."""
    train = write_class_folder(tmp_path / 'train', [4, 4], seed=1)
    planted = our_model_file(tmp_path / 'model.pt', Plain(marker))
    data = [f'data.root={train}', f'val_data.root={train}', 'data.num_workers=0', 'val_data.num_workers=0']
    ds = write_ds(tmp_path)  # ZeRO-0: the probe's LARS
    for script, task, config in (
        ('finetune', 'finetune', 'finetune_debug'),
        ('linear_probe', 'linprobe', 'linprobe_vit_base'),
    ):
        proc = run_python(
            [
                f'launch/{script}.py',
                '--config',
                config,
                '--deepspeed_config',
                ds,
                *MODEL_ARGS,
                *data,
                f'{task}.pretrained={planted}',
                f'{task}.output_dir={tmp_path / task}',
            ]
        )
        assert proc.returncode == 2, tail(proc)
        assert_refused(proc.stderr, planted, SYSTEM, marker)
    classifier = save_classifier_file(
        tmp_path / 'model_best.pt',
        ViTClassifier(MODEL, 2).state_dict(),
        kind='finetune',
        model_cfg=MODEL,
        num_classes=2,
        img_size=32,
        extra={'epoch': Plain(marker)},
    )
    proc = run_python(['launch/evaluate.py', '--config', 'finetune_debug', str(classifier), f'val_data.root={train}'])
    assert proc.returncode == 2, tail(proc)
    assert_refused(proc.stderr, classifier, SYSTEM, marker)
