"""retrieval.filters: the expression language against a row-by-row reference, metadata.csv, and
the filtered top k against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.filters import (
    Columns,
    column_kind,
    filtered_topk,
    parse_filter,
    read_metadata,
    tokenize,
)
from retrieval.search import ExactIndex, similarity
from tfcbir import UserError

# --- the language ---------------------------------------------------------------------------------


def shop() -> dict[str, np.ndarray]:
    """Six items; row 5 has every value missing."""
    return {
        "category": np.array(["tote", "bag", "tote", "wallet", "Tote", None], dtype=object),
        "price": np.array([50.0, 150.0, 99.5, 20.0, 100.0, np.nan]),
        "colour": np.array(["red", "blue", "green", "red", "blue", ""]),
        "in_stock": np.array([True, False, None, True, False, None], dtype=object),
        "added": np.array(
            ["2024-01-01", "2024-05-01", "2023-12-31", "2024-01-02", "2022-01-01", "NaT"],
            dtype="datetime64[D]",
        ),
        "count": np.array([1, 2, 3, 4, 5, 6]),
    }


def matches(expression: str, columns=None) -> list[int]:
    return np.flatnonzero(parse_filter(expression).mask(columns or shop())).tolist()


@pytest.mark.parametrize(
    "expression, rows",
    [
        ("category == 'tote' and price < 100", [0, 2]),
        ('category == "tote"', [0, 2]),  # text compares exactly: 'Tote' is another value
        ("category != 'tote'", [1, 3, 4]),  # a missing value matches no comparison
        ("price <= 99.5", [0, 2, 3]),
        ("price > 99.5", [1, 4]),
        ("price >= 1e2", [1, 4]),
        ("price == 100", [4]),
        ("price > -5", [0, 1, 2, 3, 4]),
        ("count in [2, 4]", [1, 3]),
        ("count not in [2, 4]", [0, 2, 4, 5]),
        ("colour in ['red', 'blue']", [0, 1, 3, 4]),
        ("colour == ''", [5]),  # a str array has no missing values: '' is a value
        ("in_stock == true", [0, 3]),
        ("in_stock != true", [1, 4]),
        ("in_stock in [false]", [1, 4]),
        ("added >= '2024-01-01'", [0, 1, 3]),
        ("added < '2024-01-01'", [2, 4]),
        ("added == '2024-05-01'", [1]),
        ("added in ['2022-01-01', '2023-12-31']", [2, 4]),
        ("category < 'toto'", [0, 1, 2, 4]),  # by code point: 'Tote' < 'bag' < 'tote'
        ("not (colour in ['red', 'blue']) or in_stock == true", [0, 2, 3, 5]),
        ("not price < 100", [1, 4]),  # not of unknown (row 5) is unknown
        ("price < 100 or category == 'bag'", [0, 1, 2, 3]),
        ("NOT (price < 100) AND count IN [2, 5] Or in_stock == TRUE", [0, 1, 3, 4]),
    ],
)
def test_expressions_select_the_rows_they_say(expression, rows):
    assert matches(expression) == rows


def test_precedence_not_then_and_then_or():
    columns = shop()
    assert matches("price < 60 or price > 120 and count == 1") == matches(
        "price < 60 or (price > 120 and count == 1)"
    )
    assert matches("price < 60 or price > 120 and count == 1") == [0, 3]
    assert matches("not price < 60 and count > 4") == matches("(not price < 60) and count > 4")
    assert matches("not price < 60 and count > 4") == [4]
    assert matches("not not price < 60", columns) == matches("price < 60", columns)


def test_missing_values_follow_three_valued_logic():
    # Row 5 has no price and no category: unknown or true is true, unknown and false is false.
    assert 5 in matches("price < 100 or count == 6")
    assert 5 not in matches("price < 100 or count == 7")
    assert 5 in matches("not (price < 100 and count == 7)")  # unknown and false = false
    assert 5 not in matches("not (price < 100 and count == 6)")  # unknown and true = unknown
    assert 5 not in matches("category not in ['bag']")


def test_names_in_backticks_strings_with_escapes_and_the_label():
    columns = {
        "unit price": np.array([1.0, 2.0]),
        "and": np.array(["it's", 'say "hi"'], dtype=object),
    }
    assert matches("`unit price` > 1", columns) == [1]
    assert matches(r"`and` == 'it\'s'", columns) == [0]
    assert matches(r"""`and` == 'say "hi"' or `and` == "it's" """, columns) == [0, 1]
    assert matches(r"""`and` == "say \"hi\"" """, columns) == [1]
    with pytest.raises(UserError, match=r"^where: no column 'price'"):
        parse_filter("price > 1", label="where").mask(columns)


def random_tree(rng, depth=0):
    """(expression text, reference: row dict -> True / False / None) over the shop's columns."""
    if depth < 3 and rng.random() < 0.6:
        kind = rng.choice(["and", "or", "not"])
        if kind == "not":
            text, ref = random_tree(rng, depth + 1)
            return f"not ({text})", lambda row: None if ref(row) is None else not ref(row)
        (a, fa), (b, fb) = random_tree(rng, depth + 1), random_tree(rng, depth + 1)
        if kind == "and":
            return f"({a}) and ({b})", lambda row: kleene_and(fa(row), fb(row))
        return f"({a}) or ({b})", lambda row: kleene_or(fa(row), fb(row))
    return random_condition(rng)


def random_condition(rng):
    import operator

    ops = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, ">=": operator.ge}
    name = rng.choice(["category", "price", "in_stock", "added"])
    values = {
        "category": ["tote", "bag", "wallet", "x"],
        "price": [20, 50.0, 99.5, 100, 150],
        "in_stock": [True, False],
        "added": ["2024-01-01", "2022-01-01", "2024-05-01"],
    }[name]
    if rng.random() < 0.3:
        chosen = [values[i] for i in rng.choice(len(values), 2, replace=False)]
        negated = rng.random() < 0.5
        listed = ", ".join(literal(v) for v in chosen)
        text = f"{name} {'not in' if negated else 'in'} [{listed}]"
        return text, lambda row: None if row[name] is None else (row[name] in chosen) != negated
    op = "==" if name == "in_stock" else rng.choice(list(ops))
    value = values[rng.integers(len(values))]
    return (
        f"{name} {op} {literal(value)}",
        lambda row: None if row[name] is None else bool(ops[op](row[name], value)),
    )


def literal(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def kleene_and(a, b):
    if a is False or b is False:
        return False
    return None if a is None or b is None else True


def kleene_or(a, b):
    if a is True or b is True:
        return True
    return None if a is None or b is None else False


def test_random_expressions_equal_a_row_by_row_reference():
    rng = np.random.default_rng(0)
    columns = shop()
    rows = []
    for i in range(6):
        added = columns["added"][i]
        rows.append(
            {
                "category": columns["category"][i],
                "price": None if np.isnan(columns["price"][i]) else columns["price"][i],
                "in_stock": columns["in_stock"][i],
                "added": None if np.isnat(added) else str(added),  # ISO text orders as dates
            }
        )
    table = Columns(columns)
    for _ in range(300):
        text, reference = random_tree(rng)
        expected = [reference(row) is True for row in rows]
        assert parse_filter(text).mask(table).tolist() == expected, text


def test_filter_lists_its_columns_and_tokens_carry_positions():
    parsed = parse_filter("(price < 3 or colour == 'red') and not price > 1")
    assert parsed.columns() == ["price", "colour"]
    tokens = tokenize("a >= -1.5e2")
    assert [(t.kind, t.value, t.start) for t in tokens] == [
        ("name", "a", 0),
        ("operator", ">=", 2),
        ("number", -150.0, 5),
        ("end", None, 11),
    ]


@pytest.mark.parametrize(
    "expression, message",
    [
        ("", "--where: the expression is empty"),
        ("   ", "--where: the expression is empty"),
        (
            "price < 'cheap'",
            "--where: price < 'cheap': price is a number column; compare it with a number",
        ),
        ("colour == 1", "colour == 1: colour is a text column; compare it with a quoted string"),
        ("colour in ['red', 2]", "colour is a text column"),
        ("in_stock == 'yes'", "in_stock is a true/false column; compare it with true or false"),
        ("in_stock < true", "in_stock is a true/false column; compare it with == or !="),
        ("added > 2024", "added is a date column; compare it with a date in quotes"),
        ("added > '2024-02-30'", "'2024-02-30' is not a date; write dates as 'YYYY-MM-DD'"),
        ("prices < 3", "no column 'prices'; did you mean 'price'?"),
        ("zzz < 3", "no column 'zzz' (columns: category, price,"),
        (
            "category == tote",
            "expected a value (a quoted string, a number, true or false) at "
            "position 13, found 'tote' (quote text: 'tote')",
        ),
        ("price = 3", "'=' at position 7: use == to compare"),
        ("price < 3 && count > 1", "'&&' at position 11: use and"),
        ("price < 3 || count > 1", "'||' at position 11: use or"),
        ("!price", "'!' at position 1: use not"),
        ("price < 3 count > 1", "unexpected 'count' at position 11; join conditions with and"),
        ("(price < 3", "expected ')' or and / or at position 11, found the end of the expression"),
        ("price < 3)", "unexpected ')' at position 10"),
        ("price <", "expected a value (a quoted string, a number, true or false) at position 8"),
        ("price", "expected a comparison (==, !=, <, <=, >, >=, in, not in) after price"),
        ("price not 3", "expected in after not at position 11, found '3'"),
        ("price in 3", "expected a list of values in [ ] at position 10"),
        ("price in [1 2]", "expected ',' or ']' at position 13, found '2'"),
        ("3 < price", "expected a column name at position 1, found '3'"),
        ("price < 3 and", "expected a column name at position 14, found the end"),
        ("or == 1", "a keyword; write a column of that name as `or`"),
        ("colour == 'red", "the string at position 11 has no closing '"),
        ("`colour == 1", "the column name at position 1 has no closing `"),
        ("price < 1.2.3", "unexpected '1.2.3' at position 9"),
        ("price < 3 $", "unexpected '$' at position 11"),
        ("(" * 150 + "price < 3" + ")" * 150, "nest deeper than 100"),
        ("not " * 150 + "price < 3", "nest deeper than 100"),
    ],
)
def test_bad_expressions_get_one_line_naming_the_token_or_column(expression, message):
    with pytest.raises(UserError) as caught:
        parse_filter(expression).mask(shop())
    text = str(caught.value)
    assert message in text and "\n" not in text and text.startswith("--where: ")


def test_columns_kinds_and_callers_mistakes():
    assert column_kind(np.array([1, 2])) == "number"
    assert column_kind(np.array([1.5, np.nan])) == "number"
    assert column_kind(np.array([1, None, 2.5], dtype=object)) == "number"
    assert column_kind(np.array(["a", None], dtype=object)) == "text"
    assert column_kind(np.array([None, None], dtype=object)) == "text"
    assert column_kind(np.array([True, None], dtype=object)) == "boolean"
    assert column_kind(np.array([True, False])) == "boolean"
    assert column_kind(np.array(["2024-01-01"], dtype="datetime64[D]")) == "date"
    assert matches("n > 1", {"n": np.array([1, None, 2.5], dtype=object)}) == [2]
    numpy_scalars = np.array([np.int64(3), np.float32(np.nan), np.float64(0.5)], dtype=object)
    assert column_kind(numpy_scalars) == "number"
    assert matches("n < 4", {"n": numpy_scalars}) == [0, 2]
    flags = np.array([np.True_, None, np.False_], dtype=object)
    assert column_kind(flags) == "boolean" and matches("f != true", {"f": flags}) == [2]
    with pytest.raises(ValueError, match="mixes"):
        column_kind(np.array(["a", 1], dtype=object))
    with pytest.raises(ValueError, match="different lengths"):
        Columns({"a": np.zeros(2), "b": np.zeros(3)})
    # A literal longer than a column's fixed-width strings is not cut to fit.
    assert matches("c in ['ab', 'abc']", {"c": np.array(["ab", "a"])}) == [0]
    assert matches("c == 'abc'", {"c": np.array(["ab", "a"])}) == []


# --- metadata.csv ---------------------------------------------------------------------------------


def write(path, text: str, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def test_read_metadata_infers_kinds_and_aligns_to_the_gallery(tmp_path):
    csv = write(
        tmp_path / "metadata.csv",
        "\ufeffpath,category,price,added,in_stock,note\n"
        "b/1.jpg, bag ,150,2024-05-01,False,\n"
        './a\\0.jpg,tote,50,2024-01-01,true,"x, y"\n'
        "\n"
        "gone/9.jpg,wallet,1e1,2020-01-01,TRUE,z\n"
        f"{tmp_path}/c/2.jpg,Tote,,,,\n",
    )
    gallery = ["a/0.jpg", "b/1.jpg", "c/2.jpg", "d/3.jpg"]
    columns = read_metadata(csv, gallery)
    assert list(columns) == ["path", "category", "price", "added", "in_stock", "note"]
    assert columns["path"].tolist() == gallery
    assert columns["category"].tolist() == ["tote", "bag", "Tote", None]
    np.testing.assert_array_equal(columns["price"], [50.0, 150.0, np.nan, np.nan])
    assert columns["added"].dtype == np.dtype("datetime64[D]")
    assert [str(d) for d in columns["added"]] == ["2024-01-01", "2024-05-01", "NaT", "NaT"]
    assert columns["in_stock"].tolist() == [True, False, None, None]
    assert columns["note"].tolist() == ["x, y", None, None, None]
    assert matches("price < 100 and in_stock == true", columns) == [0]
    assert matches("added < '2024-02-01' or category == 'Tote'", columns) == [0, 2]


def test_read_metadata_mixed_cells_are_text(tmp_path):
    csv = write(tmp_path / "m.csv", "path,size,day\na.jpg,12,2024-01-01\nb.jpg,XL,2024-02-30\n")
    columns = read_metadata(csv, ["a.jpg", "b.jpg"])
    assert columns["size"].tolist() == ["12", "XL"] and columns["day"].dtype == object
    with pytest.raises(UserError, match="size is a text column"):
        parse_filter("size < 20").mask(columns)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "m.csv: the file is empty"),
        ("file,price\na.jpg,1\n", "m.csv:1: no 'path' column among file, price"),
        ("Path,price\na.jpg,1\n", "(is 'Path' it? name it path)"),
        ("path,,price\n", "m.csv:1: column 2 of the header has no name"),
        ("path,a,a\n", "m.csv:1: two columns are named 'a'"),
        ("path,price\na.jpg,1\nb.jpg,1,2\n", "m.csv:3: 3 fields, the header has 2 (path, price)"),
        ("path,price\na.jpg,1\n,2\n", "m.csv:3: the path is empty"),
        (
            "path,price\na.jpg,1\n./a.jpg,2\n",
            "m.csv:3: a second row for 'a.jpg' (the first is line 2)",
        ),
    ],
)
def test_read_metadata_errors_name_the_file_and_line(tmp_path, text, message):
    csv = write(tmp_path / "m.csv", text)
    with pytest.raises(UserError) as caught:
        read_metadata(csv, ["a.jpg"])
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_read_metadata_missing_file_and_not_utf8(tmp_path):
    with pytest.raises(UserError, match=r"metadata.csv: no such file"):
        read_metadata(tmp_path / "metadata.csv", ["a.jpg"])
    csv = write(tmp_path / "m.csv", "path,name\na.jpg,caf\u00e9\n", encoding="latin-1")
    with pytest.raises(UserError, match=r"m.csv:2: not UTF-8"):
        read_metadata(csv, ["a.jpg"])


# --- the filtered top k ---------------------------------------------------------------------------


def brute_force(queries, gallery, normalized, mask, k, exclude=None):
    """The k best matching items of each query by sorting every score (ties: lower index)."""
    scores = similarity(queries, gallery, normalized=normalized)
    results = []
    for q, row in enumerate(scores):
        allowed = mask.copy()
        if exclude is not None and exclude[q] >= 0:
            allowed[exclude[q]] = False
        items = np.flatnonzero(allowed)
        order = items[np.lexsort((items, -row[items]))][:k]
        results.append(order.tolist() + [-1] * (k - len(order)))
    return np.array(results)


def integer_data(seed, n_gallery=300, n_queries=20, dim=8):
    """Small integers: every dot product is exact in float32, so rankings are exact too."""
    rng = np.random.default_rng(seed)
    gallery = rng.integers(-3, 4, size=(n_gallery, dim)).astype(np.float32)
    queries = rng.integers(-3, 4, size=(n_queries, dim)).astype(np.float32)
    return rng, queries, gallery


@pytest.mark.parametrize("share", [0.9, 0.3, 0.05, 0.01])
@pytest.mark.parametrize("leave_one_out", [False, True])
def test_filtered_topk_equals_brute_force(share, leave_one_out):
    rng, queries, gallery = integer_data(int(share * 100) + leave_one_out)
    mask = rng.random(len(gallery)) < share
    exclude = None
    if leave_one_out:
        exclude = rng.choice(len(gallery), len(queries), replace=False)
        queries = gallery[exclude]
    for k in (1, 5, 40):
        scores, indices = filtered_topk(ExactIndex(gallery, False), queries, k, mask, exclude)
        expected = brute_force(queries, gallery, False, mask, k, exclude)
        np.testing.assert_array_equal(indices, expected)
        found = indices >= 0
        assert mask[indices[found]].all()
        want = similarity(queries, gallery, normalized=False)
        np.testing.assert_allclose(
            scores[found], np.take_along_axis(want, np.maximum(indices, 0), 1)[found], atol=1e-4
        )
        assert (scores[~found] == -np.inf).all()
        # Never fewer than k when k match.
        available = mask.sum() - (mask[exclude] if exclude is not None else 0)
        assert (found.sum(axis=1) == np.minimum(k, available)).all()


class CountingIndex:
    """An ExactIndex seen as any index: the widening path, counting the candidates asked."""

    def __init__(self, embeddings, normalized, limit=None):
        self.exact = ExactIndex(embeddings, normalized)
        self.normalized = normalized
        self.asked: list[int] = []
        self.limit = limit  # like an IVF index's probed lists: at most this many candidates

    def __len__(self):
        return len(self.exact)

    def search(self, queries, k, exclude=None):
        self.asked.append(k)
        scores, indices = self.exact.search(queries, k, exclude)
        if self.limit is not None and k > self.limit:
            scores[:, self.limit :], indices[:, self.limit :] = -np.inf, -1
        return scores, indices


def test_widening_reaches_k_when_matches_are_rare():
    rng = np.random.default_rng(3)
    gallery = rng.normal(size=(2000, 16)).astype(np.float32)
    queries = rng.normal(size=(10, 16)).astype(np.float32)
    mask = np.zeros(len(gallery), dtype=bool)
    mask[rng.choice(len(gallery), 12, replace=False)] = True  # 0.6%
    index = CountingIndex(gallery, False)
    scores, indices = filtered_topk(index, queries, 10, mask)
    assert index.asked[0] == 10 and len(index.asked) > 1  # it had to widen
    assert index.asked == [min(10 * 4**i, 2000) for i in range(len(index.asked))]
    assert (indices >= 0).all() and mask[indices].all()
    np.testing.assert_array_equal(indices, brute_force(queries, gallery, False, mask, 10))
    # The same answers through the exact index's subset search.
    _, exact = filtered_topk(ExactIndex(gallery, False), queries, 10, mask)
    np.testing.assert_array_equal(exact, indices)


def test_fewer_than_k_only_when_fewer_match():
    rng, queries, gallery = integer_data(5)
    mask = np.zeros(len(gallery), dtype=bool)
    mask[[7, 100, 299]] = True
    for index in (ExactIndex(gallery, True), CountingIndex(gallery, True)):
        scores, indices = filtered_topk(index, queries, 5, mask)
        assert (np.sort(indices[:, :3], axis=1) == [7, 100, 299]).all()
        assert (indices[:, 3:] == -1).all() and (scores[:, 3:] == -np.inf).all()
    # Leave-one-out of a matching item: two are left.
    _, indices = filtered_topk(CountingIndex(gallery, True), gallery[[7]], 5, mask, [7])
    assert sorted(indices[0, :2]) == [100, 299] and (indices[0, 2:] == -1).all()
    # Nothing matches: all padding, no search.
    index = CountingIndex(gallery, True)
    _, indices = filtered_topk(index, queries, 3, np.zeros(len(gallery), dtype=bool))
    assert (indices == -1).all() and index.asked == []


def test_an_approximate_index_answers_what_its_candidates_hold():
    rng, queries, gallery = integer_data(6)
    mask = np.zeros(len(gallery), dtype=bool)
    mask[rng.choice(len(gallery), 30, replace=False)] = True
    index = CountingIndex(gallery, False, limit=40)  # never more than 40 candidates
    _, indices = filtered_topk(index, queries, 10, mask)
    # It stops widening once the index pads (no more candidates), and keeps what matched.
    assert index.asked == [10, 40, 160]
    best = brute_force(queries, gallery, False, np.ones(len(gallery), bool), 40)
    for row, candidates in zip(indices, best):
        expected = [i for i in candidates if mask[i]][:10]
        assert row[: len(expected)].tolist() == expected and (row[len(expected) :] == -1).all()


def test_filtered_topk_with_faiss():
    pytest.importorskip("faiss")
    from retrieval.faiss_index import FaissIndex

    rng, queries, gallery = integer_data(7, n_gallery=500)
    mask = rng.random(len(gallery)) < 0.02
    index = FaissIndex.build(gallery, normalized=False, factory="Flat")
    _, indices = filtered_topk(index, queries, 5, mask)
    np.testing.assert_array_equal(indices, brute_force(queries, gallery, False, mask, 5))


def test_filtered_topk_checks_its_arguments():
    _, queries, gallery = integer_data(8)
    index = ExactIndex(gallery, False)
    with pytest.raises(ValueError, match=r"mask must be \(300,\) bool"):
        filtered_topk(index, queries, 3, np.ones(10, dtype=bool))
    with pytest.raises(ValueError, match="mask must be"):
        filtered_topk(index, queries, 3, np.ones(300))
    with pytest.raises(ValueError, match="k must be >= 1"):
        filtered_topk(index, queries, 0, np.ones(300, dtype=bool))
