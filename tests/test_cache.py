import hashlib
import os
from pathlib import Path

from infermatrix.cache import cache_dir, file_sha256


def test_cache_dir_comes_from_the_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("INFERMATRIX_CACHE", str(tmp_path / "x"))
    assert cache_dir("peaks") == tmp_path / "x" / "peaks" and (tmp_path / "x" / "peaks").is_dir()
    monkeypatch.delenv("INFERMATRIX_CACHE")
    assert cache_dir("peaks") == Path.home() / ".cache" / "infermatrix" / "peaks"


def test_file_sha256_is_remembered_until_the_file_changes(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"hello world, hashed in blocks")
    want = hashlib.sha256(b"hello world, hashed in blocks").hexdigest()
    assert file_sha256(f) == want
    # Same size and mtime: the memo answers without reading the (changed) bytes.
    st = f.stat()
    f.write_bytes(b"HELLO world, hashed in blocks")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_sha256(f) == want
    # A new mtime means the file is hashed again.
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert file_sha256(str(f)) == hashlib.sha256(b"HELLO world, hashed in blocks").hexdigest()
