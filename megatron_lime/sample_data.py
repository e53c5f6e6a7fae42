"""A sample corpus that needs no download: English prose from the Python standard library.

Every Python installation carries a few MB of carefully written English in its docstrings.
They are read with `ast` from the standard library's source files (nothing is imported, so no
module's side effects run), in sorted file order, so the corpus is the same on every run of
the same Python version.

Two files come out of it:
  pretraining JSONL in FineWeb-Edu's schema (text, id, dump, url, file_path, language,
      language_score, token_count, score, int_score): one document per module;
  instruction JSONL in databricks-dolly-15k's schema (instruction, context, response, category),
      so the real SFT adapter reads it.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
import textwrap
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from megatron_lime.files import atomic_write

STDLIB_URL = "https://docs.python.org/3/library/{module}.html"
SKIPPED_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__",
                "turtledemo", "ensurepip"}
# pydoc_data/topics.py holds the language reference's topics as plain strings: the richest prose
# in the standard library, read as one document per topic.
PYDOC_TOPICS = "pydoc_data.topics"


@dataclass
class DocumentedFunction:
    qualified_name: str  # e.g. "json.dumps" or "collections.OrderedDict.move_to_end"
    signature: str  # e.g. "dumps(obj, *, skipkeys=False, ...)"
    docstring: str


@dataclass
class ModuleDocs:
    module: str
    relative_path: str
    docstring: str
    functions: list[DocumentedFunction] = field(default_factory=list)

    def url(self) -> str:
        if self.module.startswith("reference/"):
            return f"https://docs.python.org/3/reference/#{self.module.removeprefix('reference/')}"
        return STDLIB_URL.format(module=self.module)

    def text(self) -> str:
        """The module's documentation as one prose document."""
        parts = [self.docstring] if self.docstring else []
        for fn in self.functions:
            parts.append(f"{fn.qualified_name}{fn.signature[fn.signature.index('('):]}\n\n{fn.docstring}")
        return "\n\n".join(parts)


def stdlib_source_files(root: str | None = None) -> list[tuple[str, str]]:
    """(module name, path) of every .py file of the standard library, sorted."""
    root = root or sysconfig.get_paths()["stdlib"]
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIPPED_DIRS and not d.startswith("."))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            relative = os.path.relpath(os.path.join(directory, name), root)
            module = relative[:-3].replace(os.sep, ".").removesuffix(".__init__")
            if any(part.startswith("_") for part in module.split(".")):
                continue  # private modules: implementation notes rather than documentation
            found.append((module, os.path.join(directory, name)))
    return sorted(found)


def _is_english_prose(docstring: str) -> bool:
    words = docstring.split()
    return len(words) >= 8 and sum(w.isascii() for w in words) / len(words) > 0.95


def read_module_docs(module: str, path: str, root: str) -> ModuleDocs | None:
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None
    docs = ModuleDocs(module=module, relative_path=os.path.relpath(path, root),
                      docstring=inspect_clean(ast.get_docstring(tree)))
    for node in tree.body:
        candidates = [(node, node.name)] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else []
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            class_doc = inspect_clean(ast.get_docstring(node))
            if _is_english_prose(class_doc):
                docs.functions.append(DocumentedFunction(f"{module}.{node.name}", _signature(node), class_doc))
            candidates += [(child, f"{node.name}.{child.name}") for child in node.body
                           if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for fn, name in candidates:
            if fn.name.startswith("_"):
                continue
            docstring = inspect_clean(ast.get_docstring(fn))
            if _is_english_prose(docstring):
                docs.functions.append(DocumentedFunction(f"{module}.{name}", _signature(fn), docstring))
    if not _is_english_prose(docs.docstring) and not docs.functions:
        return None
    return docs


def _signature(node: ast.AST) -> str:
    if isinstance(node, ast.ClassDef):
        init = next((c for c in node.body if isinstance(c, ast.FunctionDef) and c.name == "__init__"), None)
        return f"{node.name}({ast.unparse(init.args) if init else ''})"
    return f"{node.name}({ast.unparse(node.args)})"


def read_pydoc_topics(path: str) -> list[tuple[str, str]]:
    """(topic, text) pairs of pydoc_data/topics.py, read from its dict literal without importing it."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            return [(k.value, inspect_clean(v.value)) for k, v in zip(node.value.keys, node.value.values)
                    if isinstance(k, ast.Constant) and isinstance(v, ast.Constant) and isinstance(v.value, str)]
    return []


def inspect_clean(docstring: str | None) -> str:
    return textwrap.dedent(docstring or "").strip()


def iter_module_docs(root: str | None = None) -> Iterator[ModuleDocs]:
    root = root or sysconfig.get_paths()["stdlib"]
    for module, path in stdlib_source_files(root):
        if module == PYDOC_TOPICS:
            for topic, text in read_pydoc_topics(path):
                if _is_english_prose(text):
                    yield ModuleDocs(module=f"reference/{topic}", relative_path=os.path.relpath(path, root),
                                     docstring=text)
            continue
        docs = read_module_docs(module, path, root)
        if docs is not None:
            yield docs


def _stable_uuid(text: str) -> str:
    return str(uuid.UUID(bytes=hashlib.sha256(text.encode()).digest()[:16], version=4))


@dataclass
class CorpusDocument:
    """One pretraining document and where it came from (its FineWeb-Edu id is derived from `key`)."""

    key: str
    text: str
    url: str
    file_path: str


def module_documents(root: str | None = None) -> Iterator[CorpusDocument]:
    """The standard library's documentation, one document per module (or reference topic)."""
    for docs in iter_module_docs(root):
        yield CorpusDocument(docs.module, docs.text(), docs.url(), f"python-stdlib/{docs.relative_path}")


def write_pretraining_corpus(path: str, max_bytes: int = 4_000_000, root: str | None = None,
                             documents: Iterable[CorpusDocument] | None = None) -> dict:
    """JSONL in FineWeb-Edu's schema until max_bytes of text; returns a summary.

    The documents are `module_documents(root)` unless given (the tests pass their own).
    """
    documents_written = text_bytes = 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "w") as out:
        for document in module_documents(root) if documents is None else documents:
            if text_bytes >= max_bytes:
                break
            words = len(document.text.split())
            score = min(5.0, 2.5 + words / 2000)
            record = {
                "text": document.text,
                "id": f"<urn:uuid:{_stable_uuid(document.key)}>",
                "dump": "CC-MAIN-2025-05",
                "url": document.url,
                "file_path": document.file_path,
                "language": "en",
                "language_score": 0.95,
                "token_count": round(words * 1.3),  # an estimate: FineWeb-Edu counts GPT-2 tokens
                "score": round(score, 3),
                "int_score": int(round(score)),
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            documents_written += 1
            text_bytes += len(document.text.encode())
    return {"documents": documents_written, "bytes": text_bytes, "path": path}


def first_paragraph(docstring: str) -> str:
    return " ".join(docstring.split("\n\n")[0].split())


def write_instruction_set(path: str, max_examples: int = 2000, root: str | None = None) -> dict:
    """JSONL in databricks-dolly-15k's schema: questions about documented functions, answered from their docstrings.

    Three kinds, as in dolly: open_qa (what does X do), closed_qa (the docstring is the context)
    and information_extraction (the signature).
    """
    examples = 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "w") as out:
        for docs in iter_module_docs(root):
            for fn in docs.functions:
                if examples >= max_examples:
                    break
                answer = first_paragraph(fn.docstring)
                kind = examples % 3
                if kind == 0:
                    record = {"instruction": f"What does {fn.qualified_name} do in Python?", "context": "",
                              "response": answer, "category": "open_qa"}
                elif kind == 1:
                    record = {"instruction": f"Summarize what this documentation says {fn.qualified_name} does.",
                              "context": fn.docstring, "response": answer, "category": "closed_qa"}
                else:
                    record = {"instruction": f"What is the signature of {fn.qualified_name}?", "context": "",
                              "response": f"The signature is {fn.signature}.", "category": "information_extraction"}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                examples += 1
            if examples >= max_examples:
                break
    return {"examples": examples, "path": path}
