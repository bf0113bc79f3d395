"""Reading documents out of data.sources: formats, globs, directories, errors, limits, builtin:stdlib."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from llmctl.config.schema import DataConfig
from llmctl.data import sources
from llmctl.data.sources import SourceStats, iter_documents, resolve_source_files
from llmctl.errors import LlmctlError


def read_all(**data) -> tuple[list, SourceStats]:
    stats = SourceStats()
    docs = list(iter_documents(DataConfig(**data), stats))
    return docs, stats


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_text_file_is_one_document_keyed_by_its_path():
    Path("a.txt").write_text("hello\nworld\n")
    docs, stats = read_all(sources=["a.txt"])
    assert [(d.key, d.text, d.source, d.continues) for d in docs] == [("a.txt", "hello\nworld\n", "a.txt", False)]
    assert stats.documents == 1 and stats.bytes == 12
    assert stats.files == [{"path": "a.txt", "bytes": 12, "sha256": hashlib.sha256(b"hello\nworld\n").hexdigest()}]


def test_jsonl_reads_the_named_field_per_line_and_skips_blank_lines():
    rows = [{"text": "one"}, {"text": "two", "id": 2}]
    Path("d.jsonl").write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    Path("e.json").write_text(json.dumps({"body": "three"}) + "\n")
    docs, stats = read_all(sources=["d.jsonl", {"path": "e.json", "field": "body"}])
    assert [(d.key, d.text) for d in docs] == [("d.jsonl:1", "one"), ("d.jsonl:3", "two"), ("e.json:1", "three")]
    assert stats.documents == 3


def test_csv_reads_the_named_column_including_quoted_multiline_cells():
    Path("t.csv").write_text('id,body\n1,"first\nline two"\n2,second\n', newline="")
    docs, _ = read_all(sources=[{"path": "t.csv", "field": "body"}])
    assert [(d.key, d.text) for d in docs] == [("t.csv:2", "first\nline two"), ("t.csv:4", "second")]


def test_csv_without_the_column_names_file_and_columns():
    Path("t.csv").write_text("id,body\n1,x\n")
    with pytest.raises(LlmctlError, match=r"t\.csv: no column 'text' \(columns: id, body\)"):
        read_all(sources=["t.csv"])


def _ragged_csv() -> str:
    lines = ["text,label,note"] + [f"row {i},pos,x" for i in range(2, 12)]
    lines[6] = "a,b,c,d,e"  # line 7: 5 fields where the header has 3
    lines[7] = "a,b"  # line 8: 2
    return "\n".join(lines) + "\n"


def test_csv_with_a_ragged_row_names_its_physical_line():
    Path("t.csv").write_text(_ragged_csv())
    with pytest.raises(LlmctlError, match=r"^t\.csv:7: 5 field\(s\) where the header has 3 \(text, label, note\)"):
        read_all(sources=["t.csv"])


def test_csv_with_a_quote_never_closed_names_the_line_it_opens_on():
    Path("t.csv").write_text('text,label\nok,pos\n"open quote,neg\nmore,pos\nrest,neg\n')
    with pytest.raises(LlmctlError, match=r"^t\.csv:3: a quote opened on this line is never closed"):
        read_all(sources=["t.csv"])


def test_csv_row_lines_count_the_lines_of_quoted_cells_before_them():
    Path("t.csv").write_text('text,label\n"two\nlines",pos\nbad,row,here\n')
    with pytest.raises(LlmctlError, match=r"^t\.csv:4: 3 field\(s\)"):
        read_all(sources=["t.csv"])


def test_csv_with_the_text_column_named_twice_is_refused():
    Path("t.csv").write_text("text,text\na,b\n")
    with pytest.raises(LlmctlError, match=r"t\.csv:1: the column 'text' is named twice"):
        read_all(sources=["t.csv"])


def test_glob_is_recursive_and_sorted():
    for name in ["b/2.txt", "a/1.txt", "a/deep/0.txt", "a/skip.md"]:
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_text(name)
    files = resolve_source_files(DataConfig(sources=["**/*.txt"]))
    assert [str(p) for p, fmt, _ in files] == ["a/1.txt", "a/deep/0.txt", "b/2.txt"]
    assert {fmt for _, fmt, _ in files} == {"text"}


def test_directory_is_read_recursively_sorted_skipping_hidden():
    for name in ["c/z.txt", "c/a/b.jsonl", "c/.hidden", "c/.git/x.txt"]:
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_text('{"text": "j"}\n' if name.endswith(".jsonl") else name)
    docs, _ = read_all(sources=["c"])
    assert [(d.key, d.text) for d in docs] == [("c/a/b.jsonl:1", "j"), ("c/z.txt", "c/z.txt")]


def test_directory_skips_bytecode_version_control_and_binary_files_and_counts_them():
    Path("pkg/__pycache__").mkdir(parents=True)
    Path("pkg/.git").mkdir()
    Path("pkg/a.py").write_text("def a():\n    return 1\n")
    Path("pkg/__pycache__/a.cpython-311.pyc").write_bytes(b"\xa7\r\r\n\0\0\0\0code")
    Path("pkg/.git/HEAD").write_text("ref: refs/heads/main\n")
    Path("pkg/logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    skipped = sources.SkippedFiles()
    files = resolve_source_files(DataConfig(sources=["pkg"]), skipped)
    assert [p.as_posix() for p, _, _ in files] == ["pkg/a.py"]
    assert skipped.to_dict() == {"binary_files": 1, "hidden_files": 0, "dirs": 2, "dir_names": [".git", "__pycache__"]}
    docs, _ = read_all(sources=["pkg"])
    assert [d.key for d in docs] == ["pkg/a.py"]


def test_not_utf8_in_a_directory_source_suggests_a_glob_of_the_text_files():
    Path("pkg").mkdir()
    Path("pkg/latin1.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(LlmctlError, match=r'pkg/latin1\.txt: not UTF-8 at byte 3 .*data\.sources=\["pkg/\*\*/\*\.py"\]'):
        read_all(sources=["pkg"])


def test_missing_path_and_empty_glob_and_empty_dir_name_the_source():
    with pytest.raises(LlmctlError, match=r"data.sources\[0\] 'nope.txt': no such file"):
        read_all(sources=["nope.txt"])
    with pytest.raises(LlmctlError, match=r"data.sources\[0\] 'x/\*.txt': the glob matches no files"):
        read_all(sources=["x/*.txt"])
    Path("empty").mkdir()
    with pytest.raises(LlmctlError, match=r"data.sources\[0\] 'empty': the directory holds no text files"):
        read_all(sources=["empty"])


def test_empty_file_is_an_error():
    Path("e.txt").write_text("")
    with pytest.raises(LlmctlError, match=r"e\.txt is empty"):
        read_all(sources=["e.txt"])
    Path("e.jsonl").write_text("\n\n")
    with pytest.raises(LlmctlError, match=r"e\.jsonl is empty"):
        read_all(sources=["e.jsonl"])


def test_non_utf8_file_is_an_error_naming_the_byte_offset():
    Path("bad.txt").write_bytes(b"fine text\n" * 10 + b"caf\xe9\n")
    with pytest.raises(LlmctlError, match=r"bad\.txt: not UTF-8 at byte 103 \(set data.encoding_errors: replace"):
        read_all(sources=["bad.txt"])


def test_non_utf8_offset_is_the_file_offset_in_a_later_piece(monkeypatch):
    monkeypatch.setattr(sources, "PIECE_BYTES", 64)
    # A valid 2-byte character straddles the first read boundary; the bad byte is far past it.
    raw = b"x" * 63 + "é".encode() + b"\n" + b"y" * 200 + b"\xff" + b"\n"
    Path("bad.txt").write_bytes(raw)
    bad_at = raw.index(b"\xff")
    with pytest.raises(LlmctlError, match=rf"not UTF-8 at byte {bad_at} "):
        read_all(sources=["bad.txt"])


def test_replace_mode_counts_only_replaced_bytes():
    Path("bad.txt").write_bytes("real \ufffd stays\n".encode() + b"caf\xe9 \xff\xfe\n")
    Path("bad.jsonl").write_bytes(b'{"text": "ok \xe9"}\n')
    docs, stats = read_all(sources=["bad.txt", "bad.jsonl"], encoding_errors="replace")
    assert docs[0].text == "real \ufffd stays\ncaf\ufffd \ufffd\ufffd\n"
    assert docs[1].text == "ok \ufffd"
    assert stats.replaced_chars == 4


def test_jsonl_bad_line_names_file_and_line():
    Path("d.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(LlmctlError, match=r"d\.jsonl:3: not valid JSON \("):
        read_all(sources=["d.jsonl"])


def test_jsonl_missing_or_non_string_field_lists_the_keys():
    Path("d.jsonl").write_text('{"text": "a"}\n{"body": "b", "id": 1}\n')
    with pytest.raises(LlmctlError, match=r"d\.jsonl:2: no string field 'text' \(keys: body, id\)"):
        read_all(sources=["d.jsonl"])
    Path("e.jsonl").write_text('{"text": 5}\n')
    with pytest.raises(LlmctlError, match=r"e\.jsonl:1: no string field 'text'"):
        read_all(sources=["e.jsonl"])


def test_max_bytes_stops_and_truncates_the_last_document():
    for i in range(5):
        Path(f"{i}.txt").write_text(f"document {i} é\n" * 10)  # 14 bytes a line, 140 a file
    docs, stats = read_all(sources=["*.txt"], max_bytes=300)
    assert [d.key for d in docs] == ["0.txt", "1.txt", "2.txt"]
    assert sum(len(d.text.encode()) for d in docs) == stats.bytes == 300
    assert docs[-1].text == ("document 2 é\n" * 10).encode()[:20].decode() and not docs[-1].continues
    # The truncated file is still hashed whole; files never reached are not listed.
    assert [f["path"] for f in stats.files] == ["0.txt", "1.txt", "2.txt"]
    assert stats.files[2]["bytes"] == 140


def test_max_bytes_never_splits_a_character():
    Path("a.txt").write_text("ééé")
    docs, stats = read_all(sources=["a.txt"], max_bytes=3)
    assert docs[0].text == "é" and stats.bytes == 2


def _lines(n: int) -> str:
    return "".join(f"line {i} {'é' * (i % 7)} {'w' * (i % 50)}\n" for i in range(n))


def test_large_text_file_is_read_in_pieces_that_join_back_to_the_file():
    text = _lines(60_000)  # about 2.9 MB: three pieces
    Path("big.txt").write_text(text)
    docs, stats = read_all(sources=["big.txt"])
    assert len(docs) >= 3
    assert "".join(d.text for d in docs) == text
    assert [d.key for d in docs] == [f"big.txt#{k}" for k in range(len(docs))]
    assert [d.continues for d in docs] == [True] * (len(docs) - 1) + [False]
    assert all(d.text.endswith("\n") for d in docs)
    assert max(len(d.text.encode()) for d in docs) <= sources.PIECE_BYTES
    assert stats.documents == 1 and stats.bytes == len(text.encode())
    assert stats.files[0]["sha256"] == hashlib.sha256(text.encode()).hexdigest()


def test_small_pieces_join_back_even_with_long_lines(monkeypatch):
    monkeypatch.setattr(sources, "PIECE_BYTES", 100)
    text = "short\n" + "é" * 500 + "\n" + _lines(40) + "no newline at the end"
    Path("t.txt").write_text(text)
    docs, _ = read_all(sources=["t.txt"])
    assert len(docs) > 5 and "".join(d.text for d in docs) == text


def test_stdlib_lists_many_py_files_none_from_site_packages():
    files = resolve_source_files(DataConfig(sources=["builtin:stdlib"]))
    assert len(files) > 100
    assert all(p.suffix == ".py" and "site-packages" not in p.parts for p, _, _ in files)
    assert [p for p, _, _ in files] == sorted(p for p, _, _ in files)
    assert {fmt for _, fmt, _ in files} == {"text"}


def test_stdlib_documents_are_keyed_relative_to_the_stdlib():
    docs, stats = read_all(sources=["builtin:stdlib"], max_bytes=50_000)
    assert docs and all(d.key.startswith("stdlib/") and d.key.endswith(".py") for d in docs)
    assert stats.bytes == 50_000
    root = sources.stdlib_root()
    first = Path(stats.files[0]["path"])
    assert root in first.parents
    assert stats.files[0]["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()


def test_stdlib_non_utf8_files_are_replaced_and_counted():
    bad = [p for p, _, _ in resolve_source_files(DataConfig(sources=["builtin:stdlib"]))
           if p.name in {"module_iso_8859_1.py", "module_koi8_r.py"}]
    if not bad:
        pytest.skip("this Python ships without the encoded test modules")
    stats = SourceStats()
    text = "".join(d.text for d in sources._text_documents(
        sources._InputFile(bad[0], str(bad[0]), True, stats), "k"))
    assert "\ufffd" in text and stats.replaced_chars > 0
