"""Options validation: `Options.from_user` directly and through torch.compile(backend="moeshard")."""

import os

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import moeshard_compile
from moeshard_compile import OptionError, Options
from moeshard_compile.backend import moeshard_backend

ACCEPTED = ("dump_dir", "inductor", "dropless")


@pytest.fixture(autouse=True)
def no_dump_env(monkeypatch):
    """Tests here must not depend on (or write to) a MOESHARD_DUMP_DIR set by whoever runs them."""
    monkeypatch.delenv("MOESHARD_DUMP_DIR", raising=False)


def test_backend_is_registered():
    assert "moeshard" in torch._dynamo.list_backends()


@pytest.mark.parametrize("given", [None, {}])
def test_defaults(given):
    opts = Options.from_user(given)
    assert opts == Options(dump_dir=None, inductor=True, dropless=False)


def test_valid_options_are_kept(tmp_path):
    opts = Options.from_user({"inductor": False, "dropless": True, "dump_dir": str(tmp_path)})
    assert (opts.inductor, opts.dropless, opts.dump_dir) == (False, True, str(tmp_path))


def test_options_instance_passes_through():
    opts = Options(inductor=False)
    assert Options.from_user(opts) is opts


def test_caller_dict_is_not_modified(tmp_path):
    given = {"dump_dir": tmp_path, "inductor": False}
    Options.from_user(given)
    assert given == {"dump_dir": tmp_path, "inductor": False}


def test_unknown_key_names_key_and_lists_accepted():
    with pytest.raises(ValueError) as info:
        Options.from_user({"bogus": 1, "inductor": False})
    message = str(info.value)
    assert "bogus" in message
    for name in ACCEPTED:
        assert name in message, f"accepted option {name!r} not listed in: {message}"
    assert isinstance(info.value, OptionError)


@pytest.mark.parametrize("key", ["inductor", "dropless"])
@pytest.mark.parametrize("value", [1, 0, "yes", "False", None, 1.0])
def test_non_bool_flag_raises_naming_key(key, value):
    with pytest.raises(ValueError) as info:
        Options.from_user({key: value})
    assert repr(key) in str(info.value)


@pytest.mark.parametrize("value", [123, 1.5, ["a"]])
def test_non_path_dump_dir_raises(value):
    with pytest.raises(ValueError, match="dump_dir"):
        Options.from_user({"dump_dir": value})


def test_pathlike_dump_dir_becomes_str(tmp_path):
    opts = Options.from_user({"dump_dir": tmp_path})
    assert opts.dump_dir == os.fspath(tmp_path) and isinstance(opts.dump_dir, str)


def test_dump_dir_defaults_to_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MOESHARD_DUMP_DIR", str(tmp_path))
    assert Options.from_user({}).dump_dir == str(tmp_path)
    assert Options.from_user(None).dump_dir == str(tmp_path)


def test_explicit_dump_dir_overrides_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MOESHARD_DUMP_DIR", str(tmp_path / "from_env"))
    assert Options.from_user({"dump_dir": str(tmp_path / "explicit")}).dump_dir == str(tmp_path / "explicit")


def test_empty_env_means_no_dumps(monkeypatch):
    monkeypatch.setenv("MOESHARD_DUMP_DIR", "")
    assert Options.from_user({}).dump_dir is None


# --- through torch.compile -------------------------------------------------------------------


def _call_compiled(**compile_kwargs):
    model = nn.Linear(4, 4)
    compiled = torch.compile(model, backend="moeshard", **compile_kwargs)
    with torch.no_grad():
        return compiled(torch.randn(2, 4))


def test_unknown_key_through_torch_compile():
    with pytest.raises(Exception) as info:
        _call_compiled(options={"bogus": 1})
    assert isinstance(info.value, ValueError), f"got {type(info.value).__mro__}"
    assert "bogus" in str(info.value)
    assert all(name in str(info.value) for name in ACCEPTED)


@pytest.mark.parametrize("key", ["inductor", "dropless"])
def test_non_bool_through_torch_compile(key):
    with pytest.raises(Exception) as info:
        _call_compiled(options={key: "yes"})
    assert isinstance(info.value, ValueError), f"got {type(info.value).__mro__}"
    assert key in str(info.value)


def test_valid_options_through_torch_compile_run():
    out = _call_compiled(options={"inductor": False, "dropless": False})
    assert out.shape == (2, 4)


def test_env_dump_dir_used_by_torch_compile(monkeypatch, tmp_path):
    monkeypatch.setenv("MOESHARD_DUMP_DIR", str(tmp_path))
    _call_compiled(options={"inductor": False})
    assert (tmp_path / "graph_0_before.py").is_file()
    assert (tmp_path / "report.json").is_file()


def test_package_exports():
    assert moeshard_compile.Options is Options
    assert issubclass(moeshard_compile.OptionError, ValueError)


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "4", None])
def test_bad_comm_chunks_raises(value):
    with pytest.raises(OptionError, match=r"option 'comm_chunks' must be a positive int"):
        Options.from_user({"comm_chunks": value})


def test_comm_chunks_is_kept():
    assert Options.from_user({"comm_chunks": 3}).comm_chunks == 3


@pytest.mark.parametrize(("options", "message"), [
    ({"overlap": "source_rank", "input_mode": "replicated"}, "input_mode 'replicated' has a single all-reduce"),
    ({"overlap": "source_rank", "comm_chunks": 2}, "leave 'comm_chunks' at 1 \\(got 2\\)"),
])
def test_overlap_refuses_what_it_cannot_schedule(options, message):
    with pytest.raises(OptionError, match=message):
        Options.from_user(options)


def test_overlap_is_kept():
    assert Options().overlap == "none"
    assert Options.from_user({"overlap": "source_rank"}).overlap == "source_rank"
