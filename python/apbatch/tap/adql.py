"""ADQL -> PostgreSQL (pg_sphere) with ``queryparser-python3``, with TAP names mapped to SQL names.

queryparser translates the geometry (``CONTAINS(POINT(...), CIRCLE(...)) = 1`` -> ``spoint(...) @
scircle(...)``) and ``TOP n`` -> ``LIMIT n``, but leaves identifiers as written, which PostgreSQL
would fold to lower case. Before translating, `to_sql` walks the parse tree and rewrites the ADQL:

- every table name (``ppdb.DiaObject``, ``DiaSource``) -> the quoted SQL ``"public"."DiaObject"``;
  a name that is not served -> `AdqlError` naming it;
- every column reference -> the quoted SQL column name, looked up case-insensitively among the
  columns of the query's tables; a name that is neither such a column nor a select-list alias ->
  `AdqlError` naming it;
- select-list aliases are quoted as declared (so they keep their case in the result);
- table aliases (correlation names) are left as written (folded alike everywhere).

User-defined functions are refused: queryparser 0.8.0 ``eval``s the text of the arguments of
geometry functions, and a function call there would run as Python in this process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import antlr4  # type: ignore[import-untyped]
from antlr4.atn.PredictionMode import PredictionMode  # type: ignore[import-untyped]
from antlr4.error.ErrorListener import ErrorListener  # type: ignore[import-untyped]
from queryparser.adql import ADQLQueryTranslator  # type: ignore[import-untyped]
from queryparser.adql.ADQLLexer import ADQLLexer  # type: ignore[import-untyped]
from queryparser.adql.ADQLParser import ADQLParser  # type: ignore[import-untyped]

from .schema import Registry, TapTable, quote_ident

__all__ = ["AdqlError", "ParsedQuery", "TableRef", "parse_adql", "to_sql"]


class AdqlError(ValueError):
    """A query the service cannot run: bad syntax, unknown table or column, unsupported feature.

    The message is one line, meant for the TAP error document.
    """


class _Errors(ErrorListener):
    def __init__(self) -> None:
        self.errors: list[str] = []

    def syntaxError(self, recognizer: Any, offendingSymbol: Any, line: int, column: int, msg: str,  # noqa: N802,N803
                    e: Any) -> None:
        near = getattr(offendingSymbol, "text", None)
        where = f"line {line}, column {column + 1}"
        self.errors.append(f"{where} near {near!r}" if near and near != "<EOF>" else f"{where}: {msg}")


@dataclasses.dataclass(frozen=True)
class TableRef:
    """A table name in the query: where it is in the text, what it names, its alias."""

    start: int
    stop: int
    """Character span of the table name (``stop`` exclusive)."""
    table: TapTable
    alias: str | None
    ref_stop: int
    """End of the whole table reference (name plus ``AS alias``), exclusive."""
    context: Any
    """The ``table_name`` parse-tree node."""
    in_from: bool
    """`True` for a table of a FROM clause, `False` for a qualifier (``ppdb.DiaSource.ra``)."""


@dataclasses.dataclass
class ParsedQuery:
    """The parse tree of one ADQL query and what the service needs from it."""

    text: str
    tree: Any
    tables: list[TableRef]
    correlation_names: set[str]
    select_aliases: dict[str, tuple[str, list[tuple[int, int]]]]
    column_refs: list[tuple[Any, Any]]
    """(qualifier context or `None`, column_name context) per column reference."""


def _parse(text: str) -> tuple[Any, list[str]]:
    """Parse tree and syntax errors of ``text``: fast SLL prediction, full LL only if SLL fails.

    The two-stage parse ANTLR recommends: SLL takes ~2 ms where LL takes 100-1000 ms on this
    grammar in Python; a query SLL parses without error has the same tree under LL.
    """
    for mode in (PredictionMode.SLL, PredictionMode.LL):
        errors = _Errors()
        lexer = ADQLLexer(antlr4.InputStream(text))
        lexer.removeErrorListeners()
        lexer.addErrorListener(errors)
        parser = ADQLParser(antlr4.CommonTokenStream(lexer))
        parser._interp.predictionMode = mode
        parser.removeErrorListeners()
        parser.addErrorListener(errors)
        tree = parser.query()
        if not errors.errors:
            break
    return tree, errors.errors


class _Translator(ADQLQueryTranslator):
    """queryparser's translator, parsing once and with the two-stage parse of `_parse`."""

    def __init__(self, query: str):
        super().__init__()
        self._query = query.rstrip(";") + ";"  # set without parsing: `to_postgresql` parses

    def parse(self) -> None:
        self.tree, errors = _parse(self.query)
        if errors:
            raise AdqlError(f"ADQL syntax error at {errors[0]}")
        self.walker = antlr4.ParseTreeWalker()
        self.parser = None  # the translation's listeners take it but do not use it


def _span(ctx: Any) -> tuple[int, int]:
    return ctx.start.start, ctx.stop.stop + 1


def _ident(ctx: Any) -> str:
    """The name an identifier context spells (delimited quotes removed)."""
    text = ctx.getText()
    if text.startswith('"') and text.endswith('"') and len(text) >= 2:
        return text[1:-1].replace('""', '"')
    return text


def _walk(ctx: Any):
    yield ctx
    for child in getattr(ctx, "children", None) or []:
        if isinstance(child, antlr4.ParserRuleContext):
            yield from _walk(child)


def parse_adql(query: str, registry: Registry) -> ParsedQuery:
    """Parse ``query`` and resolve its tables against ``registry``.

    Raises
    ------
    AdqlError
        Raised, with queryparser's position of the error, if the query is not valid ADQL (any
        statement but ``SELECT`` is not), names a table that is not served, or calls a
        user-defined function.
    """
    text = query.strip().rstrip(";").strip()
    if not text:
        raise AdqlError("QUERY is empty")
    first = text.split(None, 1)[0].upper()
    if first != "SELECT":
        raise AdqlError(f"only SELECT queries are supported, not {first!r}")
    tree, errors = _parse(text + ";")
    if errors:
        raise AdqlError(f"ADQL syntax error at {errors[0]}")
    tables: list[TableRef] = []
    correlation: set[str] = set()
    aliases: dict[str, tuple[str, list[tuple[int, int]]]] = {}
    column_refs: list[tuple[Any, Any]] = []
    for ctx in _walk(tree):
        kind = type(ctx).__name__
        if kind == "User_defined_functionContext":
            raise AdqlError(f"function {ctx.user_defined_function_name().getText()!r} is not supported")
        if kind == "Table_nameContext":
            schema = ctx.schema_name().getText() if ctx.schema_name() else None
            name = _ident(ctx.identifier())
            table = registry.find(schema.strip('"') if schema else None, name)
            if table is None:
                raise AdqlError(f"unknown table {ctx.getText()!r}; tables: {', '.join(registry.names())}")
            parent = ctx.parentCtx
            alias = ref_stop = None
            in_from = type(parent).__name__ == "Table_referenceContext"
            if in_from:
                spec = parent.correlation_specification()
                if spec is not None:
                    alias = spec.correlation_name().getText()  # as written (quoted or not)
                    ref_stop = _span(spec)[1]
            start, stop = _span(ctx)
            tables.append(TableRef(start, stop, table, alias, ref_stop or stop, ctx, in_from))
        elif kind == "Correlation_nameContext":
            correlation.add(_ident(ctx.identifier()).lower())
        elif kind == "As_clauseContext":
            col = ctx.column_name()
            name = _ident(col.identifier())
            aliases.setdefault(name.lower(), (name, []))[1].append(_span(col))
        elif kind == "Column_referenceContext":
            column_refs.append((ctx.qualifier(), ctx.column_name()))
    return ParsedQuery(text, tree, tables, correlation, aliases, column_refs)


def _replace(text: str, edits: dict[tuple[int, int], str]) -> str:
    out = []
    pos = 0
    for (start, stop), new in sorted(edits.items()):
        out.append(text[pos:start])
        out.append(new)
        pos = stop
    out.append(text[pos:])
    return "".join(out)


def _sql_names(parsed: ParsedQuery, refs: Mapping[int, str]) -> str:
    """The query's ADQL with every TAP name replaced by its quoted SQL name."""
    edits: dict[tuple[int, int], str] = {}
    tables = {ref.table.tap_name: ref.table for ref in parsed.tables}
    for n, ref in enumerate(parsed.tables):
        if n in refs:
            edits[(ref.start, ref.ref_stop)] = refs[n]
        else:
            edits[(ref.start, ref.stop)] = ref.table.sql
    for name, spans in parsed.select_aliases.values():
        for span in spans:
            edits[span] = quote_ident(name)
    for qualifier, column in parsed.column_refs:
        name = _ident(column.identifier())
        if qualifier is not None and qualifier.table_name() is None:
            q_name = qualifier.getText().strip('"')
            if q_name.lower() not in parsed.correlation_names:
                table = next((t for t in tables.values() if t.name.lower() == q_name.lower()), None)
                if table is None:
                    raise AdqlError(f"unknown table or alias {qualifier.getText()!r}")
                edits[_span(qualifier)] = quote_ident(table.sql_name)
        real = next((c.name for t in tables.values() if (c := t.column(name)) is not None), None)
        if real is None:
            alias = parsed.select_aliases.get(name.lower())
            if alias is None:
                served = ", ".join(tables) or "none"
                raise AdqlError(f"unknown column {name!r} (tables in the query: {served})")
            real = alias[0]
        edits[_span(column)] = quote_ident(real)
    return _replace(parsed.text, edits)


def to_sql(parsed: ParsedQuery, refs: Mapping[int, str] | None = None) -> str:
    """The PostgreSQL (pg_sphere) statement of a parsed query (no trailing semicolon).

    Parameters
    ----------
    parsed : `ParsedQuery`
        The query.
    refs : `~collections.abc.Mapping` [`int`, `str`], optional
        Replacements of whole table references (name and alias), by index in
        ``parsed.tables``, in ADQL with SQL names (the validity pins).

    Raises
    ------
    AdqlError
        Raised if a column is unknown, or queryparser cannot translate the query.
    """
    adql = _sql_names(parsed, refs or {})
    try:
        sql = _Translator(adql).to_postgresql()
    except AdqlError:
        raise
    except Exception as exc:  # queryparser raises bare exceptions of several kinds
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise AdqlError(f"cannot translate the query: {message}") from None
    return sql.strip().rstrip(";").strip()
