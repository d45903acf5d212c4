"""Saved directories are verified on load and written atomically (issue 26, items 1, 2 and the load-time part of 6):
masks that keep more than was saved, a manifest that lost a layer, damaged or foreign files, and a save interrupted
at any write all end in a clear error or in the old directory, never in a model that loads as something it is not."""
import builtins
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import prunekit
from conftest import tiny, without_checksums
from prunekit import io
from prunekit.io import MANIFEST, MASK_FILE


def pruned(sparsity: float, seed: int = 0):
    torch.manual_seed(seed)
    model = tiny("llama")
    report = prunekit.prune(model, sparsity, importance="magnitude", progress=False)
    return model, report


@pytest.fixture(params=[False, True], ids=["dense", "compressed"])
def saved(request, tmp_path):
    model, report = pruned(0.5)
    prunekit.save_pruned(model, tmp_path / "out", report, compressed=request.param)
    return tmp_path / "out", model, request.param


def edit_manifest(path, change) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    change(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


def masks_state(model):
    return {name: keep.clone() for name, keep in prunekit.masks(model).items()}


def test_the_manifest_records_each_layer_and_file(saved):
    path, model, _ = saved
    record = json.loads((path / MANIFEST).read_text())["integrity"]
    keeps = prunekit.masks(model)
    assert set(record["layers"]) == set(keeps)
    for name, keep in keeps.items():
        assert record["layers"][name]["kept"] == int(keep.sum()) and record["layers"][name]["shape"] == list(keep.shape)
    assert set(record["files"]) == {f.name for f in path.iterdir()} - {MANIFEST}
    loaded = prunekit.load_pruned(path)
    assert all(torch.equal(loaded.get_submodule(n).prune_mask, k) for n, k in keeps.items())


def test_masks_that_keep_more_are_refused(tmp_path):
    """A masks file of all ones, and the masks of a 30% prune over a 50% one, loaded silently before."""
    model, report = pruned(0.5)
    path = tmp_path / "out"
    prunekit.save_pruned(model, path, report, compressed=False)
    packed = load_file(path / MASK_FILE)
    save_file({k: torch.full_like(v, 255) for k, v in packed.items()}, path / MASK_FILE)
    with pytest.raises(prunekit.MaskMismatchError, match="prunekit_masks.safetensors differs"):
        prunekit.load_pruned(path)
    other, other_report = pruned(0.3)
    prunekit.save_pruned(other, tmp_path / "other", other_report, compressed=False)
    shutil.copy(tmp_path / "other" / MASK_FILE, path / MASK_FILE)
    with pytest.raises(prunekit.MaskMismatchError, match="prunekit_masks.safetensors differs"):
        prunekit.load_pruned(path)
    # the file checksums brought in line with the foreign masks: the layer records still refuse, naming a layer
    edit_manifest(path, lambda m: m["integrity"]["files"].update({MASK_FILE: io.file_sha256(path / MASK_FILE)}))
    with pytest.raises(prunekit.MaskMismatchError, match=r"the mask of model\.layers\.0\.\S+ is not the one saved: "
                                                         r"its kept is \d+, saved \d+"):
        prunekit.load_pruned(path)


@pytest.mark.parametrize("edit", ["empty", "one layer less"])
def test_a_manifest_that_lost_layers_is_refused(saved, edit):
    path, model, _ = saved
    first = sorted(prunekit.masks(model))[0]

    def change(manifest):
        if edit == "empty":
            manifest["masks"] = {}
        else:
            del manifest["masks"][first]
    edit_manifest(path, change)
    with pytest.raises(prunekit.MaskMismatchError, match=r"masks map lacks model\.layers\.0\."):
        prunekit.load_pruned(path)


def test_damaged_manifests_and_files_say_what_is_wrong(saved):
    path, _, compressed = saved
    text = (path / MANIFEST).read_text()
    (path / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(prunekit.PrunekitError, match="prunekit.json is not valid JSON"):
        prunekit.load_pruned(path)
    manifest = json.loads(text)
    (path / MANIFEST).write_text(json.dumps({k: v for k, v in manifest.items() if k != "masks"}))
    with pytest.raises(prunekit.PrunekitError, match="has no 'masks' map"):
        prunekit.load_pruned(path)
    (path / MANIFEST).write_text(text)
    victim = next(f for f in sorted(path.iterdir()) if f.suffix == ".safetensors")
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(prunekit.MaskMismatchError, match=f"{victim.name} differs from what save_pruned wrote"):
        prunekit.load_pruned(path)
    victim.unlink()
    with pytest.raises(prunekit.MaskMismatchError, match=f"{victim.name} is missing"):
        prunekit.load_pruned(path)


def test_older_directories_load_with_a_warning_and_their_own_checks(tmp_path):
    model, report = pruned(0.5)
    path = tmp_path / "out"
    prunekit.save_pruned(model, path, report, compressed=False)
    without_checksums(path)
    with pytest.warns(UserWarning, match="cannot be verified"):
        loaded = prunekit.load_pruned(path)
    assert all(torch.equal(loaded.get_submodule(n).prune_mask, k) for n, k in prunekit.masks(model).items())
    packed = load_file(path / MASK_FILE)
    name = sorted(packed)[0]
    save_file({**packed, name: packed[name].float()}, path / MASK_FILE)  # a float mask
    with pytest.warns(UserWarning), pytest.raises(prunekit.MaskMismatchError, match=f"no packed mask .* for {name}"):
        prunekit.load_pruned(path)
    (path / MASK_FILE).write_bytes((path / MASK_FILE).read_bytes()[:50])  # truncated
    with pytest.warns(UserWarning), pytest.raises(prunekit.MaskMismatchError, match="cannot be read .* damaged"):
        prunekit.load_pruned(path)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("compressed", [False, True], ids=["dense", "compressed"])
def test_a_save_interrupted_at_any_write_leaves_the_old_directory(tmp_path, monkeypatch, compressed):
    """Every file write in turn (and each of the two renames) fails in a re-save over an existing directory: the
    directory then loads as the old model, masks and report, and nothing is left beside it."""
    old, old_report = pruned(0.3)
    new, new_report = pruned(0.5, seed=1)
    path = tmp_path / "out"
    prunekit.save_pruned(old, path, old_report, compressed=compressed)
    expected = (masks_state(old), json.loads((path / MANIFEST).read_text())["report"])
    real_open, real_save_file, real_rename = builtins.open, io.save_file, type(path).rename
    counter = {"n": 0, "fail_at": None}

    def tick():
        counter["n"] += 1
        if counter["n"] == counter["fail_at"]:
            raise Interrupt(f"write {counter['n']}")

    def fake_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            tick()
        return real_open(file, mode, *args, **kwargs)

    def fake_save_file(*args, **kwargs):
        tick()
        return real_save_file(*args, **kwargs)

    def fake_rename(self, target):
        tick()
        return real_rename(self, target)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "save_file", fake_save_file)
    monkeypatch.setattr(type(path), "rename", fake_rename)
    counter["fail_at"] = None
    prunekit.save_pruned(new, tmp_path / "probe", new_report, compressed=compressed)  # how many writes a save makes
    writes = counter["n"]
    assert writes >= 4
    for k in range(1, writes + 1):
        counter.update(n=0, fail_at=k)
        with pytest.raises(Interrupt):
            prunekit.save_pruned(new, path, new_report, compressed=compressed)
        counter["fail_at"] = None
        loaded = prunekit.load_pruned(path)
        assert {n: torch.equal(m.prune_mask, expected[0][n]) for n, m in loaded.named_modules()
                if n in expected[0]} == dict.fromkeys(expected[0], True), k
        assert json.loads((path / MANIFEST).read_text())["report"] == expected[1], k
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "probe"], k
    counter["fail_at"] = None
    prunekit.save_pruned(new, path, new_report, compressed=compressed)
    assert all(torch.equal(prunekit.load_pruned(path).get_submodule(n).prune_mask, k)
               for n, k in masks_state(new).items())


def test_a_directory_of_other_files_is_written_in_place_manifest_last(tmp_path, monkeypatch):
    model, report = pruned(0.5)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    real = io.file_sha256
    monkeypatch.setattr(io, "file_sha256", lambda path: (_ for _ in ()).throw(Interrupt("just before the manifest")))
    with pytest.raises(Interrupt):
        prunekit.save_pruned(model, mine, report)
    with pytest.raises(prunekit.PrunekitError, match="missing prunekit.json"):  # half-written: loads as nothing
        prunekit.load_pruned(mine)
    monkeypatch.setattr(io, "file_sha256", real)
    prunekit.save_pruned(model, mine, report)
    assert (mine / "notes.txt").read_text() == "keep me"
    assert "notes.txt" not in json.loads((mine / MANIFEST).read_text())["integrity"]["files"]
    (mine / "notes.txt").write_text("changed later")  # not ours: loading does not care
    assert prunekit.masks(prunekit.load_pruned(mine)).keys() == prunekit.masks(model).keys()
    other, other_report = pruned(0.3)
    monkeypatch.setattr(io, "file_sha256", lambda path: (_ for _ in ()).throw(Interrupt("a re-save, interrupted")))
    with pytest.raises(Interrupt):
        prunekit.save_pruned(other, mine, other_report)
    with pytest.raises(prunekit.PrunekitError, match="missing prunekit.json"):  # not the old manifest over new files
        prunekit.load_pruned(mine)
    monkeypatch.setattr(io, "file_sha256", real)
    prunekit.save_pruned(other, mine, other_report)  # a re-save keeps the user's file too
    assert (mine / "notes.txt").read_text() == "changed later"
    assert all(torch.equal(prunekit.load_pruned(mine).get_submodule(n).prune_mask, k)
               for n, k in prunekit.masks(other).items())
