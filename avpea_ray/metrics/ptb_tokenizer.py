"""The COCO caption toolkit's tokenizer, in pure Python: CoreNLP 3.4.1's PTBTokenizer as the
toolkit runs it (`-preserveLines -lowerCase`), then the toolkit's punctuation filter.

`tokenize` / `tokenize_batch` give what pycocoevalcap's `PTBTokenizer` gives, without Java;
`avpea_ray.metrics.captions` scores the tokenized captions. Known differences are listed in
that module's docstring.
"""
from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

#
# The Java tokenizer is a JFlex scanner: at each position it takes the rule whose pattern
# matches the *longest* text (for a rule "r1/r2", r2 is trailing context: it counts towards the
# length but is not consumed), ties going to the rule listed first. Below, each rule is a list
# of alternative Python regexes for r1 (split so that "longest of the alternatives" does not
# depend on the order of a regex alternation), an optional trailing-context regex, and an
# action turning the matched text into output tokens. The scanner is case-insensitive except
# inside character classes, hence re.IGNORECASE with every [...] class wrapped in (?-i:...).
# The rules, their order and the abbreviation/word lists follow the token definitions of
# CoreNLP 3.4.1's PTBLexer (what its jar does), written anew as Python regexes.
#
# The toolkit writes all captions of one dict into a file, one per line, so the scanner sees
# the next caption through the newline: a few rules look ahead across it (e.g. "plan b." before
# a line starting with "The" gives "b" "." but "b." at the end of the text). `tokenize_batch`
# reproduces this by scanning the captions as one text, exactly like the toolkit.

# Tokens the toolkit drops after tokenization (compared with the lowercased tokens).
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

# Line breaks that the toolkit does not replace but the Java scanner treats as line ends.
_LINE_BREAKS = re.compile("[\r\n\u2028\u2029\x0b\x0c]")
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")
_SURROGATES = re.compile("[\ud800-\udfff]")


def _to_utf16_units(text: str) -> str:
    """Spell characters beyond the BMP as surrogate pairs, the units the Java scanner sees.

    (Most rules then drop them as untokenizable, but e.g. a URL keeps an emoji it contains.)
    """

    def pair(m: re.Match) -> str:
        cp = ord(m.group()) - 0x10000
        return chr(0xD800 + (cp >> 10)) + chr(0xDC00 + (cp & 0x3FF))

    return _ASTRAL.sub(pair, text)


def _from_utf16_units(token: str) -> str:
    """Join surrogate pairs back into characters; a lone surrogate becomes "?" as in Java's output."""
    if not _SURROGATES.search(token):
        return token
    out, i = [], 0
    while i < len(token):
        ch = token[i]
        nxt = token[i + 1] if i + 1 < len(token) else ""
        if "\ud800" <= ch <= "\udbff" and "\udc00" <= nxt <= "\udfff":
            out.append((ch + nxt).encode("utf-16-le", "surrogatepass").decode("utf-16-le"))
            i += 2
        else:
            out.append("?" if "\ud800" <= ch <= "\udfff" else ch)
            i += 1
    return "".join(out)


def _char_class(pred: Callable[[str], bool]) -> str:
    """A regex character class of the BMP characters for which `pred` holds.

    The Java scanner works on UTF-16 code units: characters outside the BMP arrive as two
    surrogates, which are never letters or digits.
    """
    ranges: list[tuple[int, int]] = []
    for cp in range(0x10000):
        if 0xD800 <= cp <= 0xDFFF or not pred(chr(cp)):
            continue
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1] = (ranges[-1][0], cp)
        else:
            ranges.append((cp, cp))
    body = "".join(f"\\u{a:04x}" if a == b else f"\\u{a:04x}-\\u{b:04x}" for a, b in ranges)
    return f"[{body}]"


def _is_letter(ch: str) -> bool:
    # Letters, plus the soft hyphen and combining marks, which the lexer keeps inside words.
    return ch.isalpha() or ch == "\u00ad" or unicodedata.category(ch) in ("Mn", "Mc")


@dataclass(frozen=True)
class _Scanner:
    """All rules compiled into one regex, so that one match call tries every rule.

    Alternative i of every rule becomes an optional lookahead "(?=(r1)(r2))" holding groups
    2i+1 (the token text) and 2i+2 (the trailing context, empty when the rule has none); a
    match at a position therefore reports what each alternative would match there.
    `actions[i]` maps the token text to (output tokens, characters consumed): None stands for
    a line end, and a match can give back its tail to be scanned again (JFlex's yypushback).
    """

    pattern: re.Pattern
    actions: tuple[Callable[[str], tuple[list[str | None], int]], ...]
    names: tuple[str, ...]
    # Matches (whole) the words that some rule treats specially before a period.
    dotted_abbreviation: re.Pattern


def _keep(text: str) -> tuple[list[str | None], int]:
    return [text], len(text)


def _emit(fn: Callable[[str], str]) -> Callable[[str], tuple[list[str | None], int]]:
    """Action that outputs fn(text) and consumes the whole match."""
    return lambda text: ([fn(text)], len(text))


def _skip(text: str) -> tuple[list[str | None], int]:
    return [], len(text)


def _pushback(n: int) -> Callable[[str], tuple[list[str | None], int]]:
    """Action that outputs the match minus its last n characters and rescans those."""
    return lambda text: ([text[:-n]], len(text) - n)


def _abbrev_then_period(text: str) -> tuple[list[str | None], int]:
    # A sentence-final abbreviation: the token keeps its period, and the period is also
    # scanned again as the sentence's full stop.
    return [text], len(text) - 1


def _acronym_then_period(text: str) -> tuple[list[str | None], int]:
    # An acronym before a typical sentence start; a single letter ("b.") loses its period.
    if len(text) == 2:
        return [text[:-1]], 1
    return [text], len(text) - 1


def _remove_soft_hyphens(text: str) -> str:
    return text.replace("\u00ad", "") or "-"


def _normalize_amp(text: str) -> str:
    return re.sub("&amp;", "&", text, flags=re.IGNORECASE)


_CURLY_QUOTES = str.maketrans(
    {"\u0091": "`", "\u2018": "`", "\u201b": "`", "\u2039": "`", "\u0092": "'", "\u2019": "'", "\u203a": "'",
     "\u0093": "``", "\u201c": "``", "\u00ab": "``", "\u0094": "''", "\u201d": "''", "\u00bb": "''"}
)


def _latex_quotes(text: str, left: bool) -> str:
    """PTB quote normalisation: straight quotes by guessed side, curly ones by their shape."""
    single, double = ("`", "``") if left else ("'", "''")
    text = text.replace("&apos;", single).replace("'", single)
    text = text.replace("&quot;", double).replace('"', double)
    return text.translate(_CURLY_QUOTES)


def _paren_escape(text: str) -> str:
    return text.replace("(", "-LRB-").replace(")", "-RRB-")


_FRACTIONS = str.maketrans({"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"})
_CURRENCY = str.maketrans(
    {"\u00a2": "cents", "\u00a3": "#", "\u0080": "$", "\u00a4": "$", "\u20a0": "$", "\u20ac": "$"}
)


def _hyphens(text: str) -> str:
    # "---" and "----" are dashes; other runs of hyphens stay as they are.
    return "--" if 3 <= len(text) <= 4 else text


@functools.lru_cache(maxsize=1)
def _scanner() -> _Scanner:
    """Build the scanner (once per process: ~0.3 s, mostly the Unicode classes)."""
    # The lexer has two notions of letter: its LETTER macro (words, file names, hashtags), which
    # adds the soft hyphen and combining marks, and the plain [:letter:] (hyphenated and
    # apostrophe words), which does not.
    L = _char_class(_is_letter)
    JL = _char_class(str.isalpha)
    D = _char_class(str.isdecimal)
    UPPER = "(?-i:" + _char_class(str.isupper) + ")"
    LD = f"(?:{L}|{D})"
    JLD = f"(?:{JL}|{D})"

    space = "[ \t\u00a0\u2000-\u200a\u3000]"
    newline = "(?:\r\n|[\r\n\u2028\u2029\x0b\x0c\x85])"
    spacenl = f"(?:{space}|{newline})"
    apos = "(?:['\u0092\u2019]|&apos;)"
    apos_etc = "(?:['\u0092\u2019`\u0091\u2018\u201b]|&apos;)"
    sgml_name = "[A-Za-z][A-Za-z0-9_:.\\-]*"
    sgml = (
        "<(?:[!?][A-Za-z\\-][^>\r\n]*"
        f"|{sgml_name}(?:[ ]+(?:{sgml_name}[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\")|{sgml_name}))*[ ]*/?"
        f"|/{sgml_name})[ ]*>"
    )
    sentend = f"{spacenl}(?:{spacenl}|{UPPER}|{sgml})"
    word = f"{L}{LD}*(?:[.!?]{L}{LD}*)*"
    redaux = f"{apos}(?:(?-i:[msdMSD])|re|ve|ll)"
    sword = "[A-Za-z\u00ad]*(?-i:[A-MO-Za-mo-z])\u00ad*"
    sredaux = f"n{apos_etc}t"
    num_sep = "[.:,\u00ad\u066b\u066c]"
    numbers = [f"[-+]?{D}+", f"[-+]?{D}*(?:{num_sep}{D}+)+"]
    hyphen = "[-_\u058a\u2010\u2011]"
    thing_part = f"(?:(?-i:[dDoOlL]){apos_etc}{JLD})?{JLD}+"
    acro_special = "(?:Canada|Sino|Korean|EU|Japan|non)-U\\.S|U\\.S\\.-(?:U\\.S\\.S\\.R|U\\.K)"
    acro = f"(?:{acro_special}|[A-Za-z](?:\\.[A-Za-z])*)"
    acro2 = f"(?:{acro_special}|[A-Za-z](?:\\.[A-Za-z])+)"
    hthing = f"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:{acro2}\\.|[A-Za-z0-9\u00ad]+))+"
    thing = f"{thing_part}(?:{hyphen}{thing_part})*"
    thinga = "(?-i:[A-Z])+(?:(?:[+&]|&amp;)(?-i:[A-Z])+)+"
    insentp = "[,;:\u3001]"

    # Abbreviation lists of the Java lexer. Some entries are case-sensitive on their first
    # letter (the lexer wrote them with a character class, e.g. "[M]iss").
    def cs(first: str, rest: str) -> str:
        return f"(?-i:{first}){rest}"

    months = "Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept|Sep|Oct|Nov|Dec"
    days = "Mon|Tues|Tue|Thurs|Thu|Wed|Fri"
    states = "|".join(
        ["Ala", "Ariz", cs("A", "z"), cs("A", "rk"), "Calif", "Colo", "Conn", "Ct", "Dak", cs("D", "el"), "Fla",
         "Ga", cs("I", "ll"), "Ind", "Kans?", "Ky", cs("L", "a"), cs("M", "ass"), "Md", "Mich", "Minn",
         cs("M", "iss"), "Mo", "Mont", "Neb", "Nev", "Okla", cs("O", "re"), cs("P", "a"), "Penn", "Tenn",
         cs("T", "ex"), "Va", "Vt", cs("W", "ash"), "Wisc?", "Wyo"]
    )
    companies = "Inc|Cos?|Corp|Pp?t(?-i:[ye])s?|Ltd|Plc|Rt|Bancorp|Bhd|Assn|Univ|Intl|Sys"
    abbrev1 = (
        f"(?:{months}|{days}|{states}|{companies}|tel|est|ext|sq"
        "|Jr|Sr|Bros|(?:Ed|Ph)\\.D|Blvd|Rd|Esq|etc|al|seq|Bldg)\\."
    )
    titles = (
        "Mr|Mrs|Ms|" + cs("M", "iss") + "|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj"
        "|Sgt|Cpl|Pvt|Capt|Ste?|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Mt|Ft|Adj|Adv|Asst"
        "|Assoc|Ens|Insp|Mlle|Mme|Msgr|Sfc"
    )
    # Two alternatives, so that "a.k.a.u.s." is matched whole as an acronym, not as "a.k.a."
    abbrev4 = [f"(?:{titles}|vs|Alex|Wm|Jos|Cie|a\\.k\\.a|cf|TREAS|Ph|Invt|Elec|Natl|M(?-i:[ft])g|Dept)", acro]
    abbrev3 = "(?:ca|figs?|prop|nos?|art|bldg|pp|op)\\."
    sentence_starts = (
        "About According Additionally After An A As At But Earlier He Her Here However If In It Last Many "
        "More Mr. Ms. Now Once One Other Our She Since So Some Such That The Their Then There These They "
        "This We When While What Yet You"
    ).split()
    starts = "|".join(cs(w[0], re.escape(w[1:])) for w in sentence_starts)
    file_ext = (
        "bat|bmp|class|cgi|cpp|c|dll|docx|doc|exe|gif|gz|html|htm|h|jar|java|jpeg|jpg|mov|mp3|pdf|php|pl|png"
        "|ppt|ps|py|sql|tar|txt|wav|xml|x|zip"
    )
    url_end = "[^ \t\n\f\r\"<>|.!?(){},-]"
    url_path = f"(?:/[^ \t\n\f\r\"<>|()]+{url_end})?"
    quote_chars = (
        "[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091\u0092\u0093\u0094"
        "\u201e\u201f\u2039\u203a\u00ab\u00bb]"
    )
    misc_symbol = (  # holds letter-like symbols (U+212A Kelvin...) that must not match "k"
        "(?-i:[+%&~^|\\\\\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00ba\u00d7\u00f7\u0387"
        "\u05be\u05c0\u05c3\u05c6\u05f3\u05f4\u0600-\u0603\u0606-\u060a\u060c\u0614\u061b\u061e"
        "\u066a\u066d\u0703-\u070d"
        "\u07f6-\u07f8\u0964\u0965\u0e4f\u1fbd\u2016\u2017\u2020-\u2023\u2030-\u2038\u203b\u203e-\u2042"
        "\u2044\u207a-\u207f\u208a-\u208e\u2100-\u214f\u2190-\u21ff\u2200-\u2bff\u3012\u30fb\uff01-\uff0f"
        "\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65])"
    )
    smiley_eye = "(?-i:[<>]?[:;=][\\-o*']?[()DPdpO\\\\{@|\\[\\]])"
    asian = "[\\-\\^x=~<>']"
    asian_smileys = [
        "(?-i:[\\^x=~<>]\\.\\[\\^x=~<>\\])",
        f"(?-i:{asian}_{asian})",
        f"(?-i:\\({asian}[_.]?{asian}\\))",
        "(?-i:\\([\\^x=~<>']-[\\^x=~<>'`]\\))",
    ]
    apowords = [
        f"{apos}n{apos}?", f"(?-i:[lLdDjJ]){apos}", f"Dunkin{apos}", f"somethin{apos}", f"ol{apos}", f"{apos}em",
        f"(?-i:[A-HJ-XZn]){apos_etc}{JL}{{2}}{JL}*", f"{apos}[2-9]0s", f"{apos}till?",
        f"{JL}+(?-i:[aeiouyAEIOUY]){apos_etc}(?-i:[aeiouA-Z]){JL}*", f"{apos}cause", "cont'd\\.?", "'twas",
        "nor'easter", "c'mon", "e'er", "s'mores", "ev'ry", "li'l", "nat'l", f"O{apos_etc}o",
    ]

    left_quote = functools.partial(_latex_quotes, left=True)
    right_quote = functools.partial(_latex_quotes, left=False)
    nbsp = _emit(lambda t: t.replace(" ", "\u00a0"))
    soft = _emit(_remove_soft_hyphens)

    spec: list[tuple[str, list[str], str | None, Callable]] = [
        ("c++", ["c\\+\\+", "(?:c|f)#"], None, _keep),
        ("cannot", ["cannot"], None, _pushback(3)),
        ("'twas", ["'twas"], None, _pushback(3)),
        ("'tis", ["'tis"], None, _pushback(2)),
        ("gonna", ["gonna|gotta|lemme|gimme|wanna"], None, _pushback(2)),
        ("sgml", [sgml], None, nbsp),
        ("mdash", ["&(?:MD|mdash|ndash);", "[\u0096\u0097\u2013\u2014\u2015]"], None, _emit(lambda t: "--")),
        ("amp", ["&amp;"], None, _emit(lambda t: "&")),
        ("sppunc", ["&(?:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);"], None, _keep),
        ("word/redaux", [word], redaux, soft),
        ("sword/sredaux", [sword], sredaux, soft),
        ("word", [word], None, soft),
        ("apoword", apowords, None, _keep),
        ("apoword2", [f"y{apos}"], JL, _keep),
        ("fullurl", [f"https?://[^ \t\n\f\r\"<>|(){{}}]+{url_end}"], None, _keep),
        ("likelyurl", [
            f"www\\.(?:[^ \t\n\f\r\"<>|.!?(){{}},]+\\.)+[a-zA-Z]{{2,4}}{url_path}",
            # (",-_" is a range: it excludes digits and upper-case letters, but not lower-case)
            f"(?:(?-i:[^ \t\n\f\r\"`'<>|.!?(){{}},-_$])+\\.)+(?:com|net|org|edu){url_path}",
        ], None, _keep),
        ("email", [
            "(?:&lt;|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00a0{}]*@(?:[^ \t\n\f\r\"<>|(){}.\u00a0]+\\.)*"
            "[^ \t\n\f\r\"<>|(){}.\u00a0]+(?:&gt;|>)?"
        ], None, _keep),
        ("twitter", ["@[a-zA-Z_][a-zA-Z_0-9]*", f"#{L}+"], None, _keep),
        ("redaux/", [redaux], "[^A-Za-z]", _emit(right_quote)),
        ("sredaux/", [sredaux], "[^A-Za-z]", _emit(right_quote)),
        ("date", [f"{D}{{1,2}}[-/]{D}{{1,2}}[-/]{D}{{2,4}}"], None, _keep),
        ("number", numbers, None, soft),
        ("subsupnum", ["[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)"],
         None, _keep),
        ("frac", [f"(?:{D}{{1,4}}[- \u00a0])?{D}{{1,4}}(?:\\\\?/|\u2044){D}{{1,4}}"], None, nbsp),
        ("frac2", ["[\u00bc\u00bd\u00be\u2153-\u215e]"], None, _emit(lambda t: t.translate(_FRACTIONS))),
        ("tbspec", ["-(?:RRB|LRB|RCB|LCB|RSB|LSB)-", "C\\.D\\.s", "pro-", "anti-", "S(?:&|&amp;)P-500",
                    "S(?:&|&amp;)Ls", f"Cap{apos}n", f"c{apos}est"], None, _emit(_normalize_amp)),
        ("thing3", ["[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"], None, _keep),
        ("dolsign", ["(?-i:[A-Z])*\\$", "#"], None, _keep),
        ("dolsign2", ["[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]"],
         None, _emit(lambda t: t.translate(_CURRENCY))),
        ("acronym/", [f"{acro}\\."], f"{spacenl}+(?:{starts}|{sgml}){spacenl}", _acronym_then_period),
        ("abbrev3/", [abbrev3], f"{spacenl}?{D}", _keep),
        ("pty/", ["(?:pt(?-i:[eyEY])|co)\\."], f"{space}(?:ltd|lim)", _keep),
        ("abbrev1/sentend", [abbrev1], sentend, _abbrev_then_period),
        ("abbrev1/..", [abbrev1], "[\\s\\S]{2}", _keep),
        ("abbrev1", [abbrev1], None, _abbrev_then_period),
        ("abbrev2", [f"{a}\\." for a in abbrev4], None, _keep),
        ("abbrev4/", abbrev4, space, _keep),
        ("acro/", [acro], spacenl, _keep),
        ("tbspec2/", [f"{apos}[0-9][0-9]"], spacenl, _keep),
        ("filename/", [f"{LD}+(?:\\.{LD}+)*\\.(?:{file_ext})"], f"(?:{spacenl}|[.?!,])", _keep),
        ("word./", [f"{word}\\."], insentp, soft),
        ("phone", [
            "(?:\\([0-9]{2,3}\\)[ \u00a0]?|(?:\\+\\+?)?(?:[0-9]{2,4}[- \u00a0])?[0-9]{2,4}[- \u00a0])"
            "[0-9]{3,4}[- \u00a0]?[0-9]{3,5}",
            "(?:(?:\\+\\+?)?[0-9]{2,4}\\.)?[0-9]{2,4}\\.[0-9]{3,4}\\.[0-9]{3,5}",
        ], None, _emit(lambda t: _paren_escape(t.replace(" ", "\u00a0")))),
        ("dblquot/", ['"', "&quot;"], "[A-Za-z0-9$]", _emit(left_quote)),
        ("dblquot", ['"', "&quot;"], None, _emit(right_quote)),
        ("del", ["\x7f"], None, _skip),
        ("lessthan", ["<", "&lt;"], None, _emit(lambda t: "<")),
        ("greaterthan", [">", "&gt;"], None, _emit(lambda t: ">")),
        ("smiley/", [smiley_eye], "[^A-Za-z0-9]", _emit(_paren_escape)),
        ("asiansmiley", asian_smileys, None, _emit(_paren_escape)),
        ("{", ["\\{"], None, _emit(lambda t: "-LCB-")),
        ("}", ["\\}"], None, _emit(lambda t: "-RCB-")),
        ("[", ["\\["], None, _emit(lambda t: "-LSB-")),
        ("]", ["\\]"], None, _emit(lambda t: "-RSB-")),
        ("(", ["\\("], None, _emit(lambda t: "-LRB-")),
        (")", ["\\)"], None, _emit(lambda t: "-RRB-")),
        ("hyphens", ["-+"], None, _emit(_hyphens)),
        ("ldots", ["\\.{3,5}", "(?:\\.[ \u00a0]){2,4}\\.", "[\u0085\u2026]"], None, _emit(lambda t: "...")),
        ("fnmarks", ["@+", "#+", "_+"], None, _keep),
        ("asts", ["\\*+", "(?:\\\\\\*){1,3}"], None, _keep),
        ("insentp", [insentp], None, _keep),
        ("?!", ["[?!]+"], None, _keep),
        ("period", ["[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]"], None, _keep),
        ("=", ["="], None, _keep),
        ("/", ["/"], None, _keep),
        ("hthing./", [f"{hthing}\\."], insentp, soft),
        ("hthing", [hthing], None, soft),
        ("thing./", [f"{thing}\\."], insentp, _keep),
        ("thing", [thing], None, _keep),
        ("thinga./", [f"{thinga}\\."], insentp, _emit(_normalize_amp)),
        ("thinga", [thinga], None, _emit(_normalize_amp)),
        ("'/", ["'"], "[A-Za-z][^ \t\n\r\u00a0]", _emit(left_quote)),
        ("redaux", [redaux], None, _emit(right_quote)),
        ("sredaux", [sredaux], None, _emit(right_quote)),
        ("quotes", [apos, "''", f"{quote_chars}{{1,2}}"], None, _emit(right_quote)),
        ("duckfeet", ["<<", ">>"], None, _keep),
        ("misc", [misc_symbol], None, _keep),
        ("space", ["\x00", f"{space}+", "[\u200b\u200e\u200f\ufeff]"], None, _skip),
        ("newline", [newline], None, lambda t: ([None], len(t))),
        ("&nbsp;", ["&nbsp;"], None, _skip),
    ]
    lookaheads, actions, names = [], [], []
    for name, pats, ctx, action in spec:
        for pat in pats:
            lookaheads.append(f"(?:(?=({pat})({ctx or ''})))?")
            actions.append(action)
            names.append(name)
    pattern = re.compile(_case_sensitive_classes("".join(lookaheads)), re.IGNORECASE)
    assert pattern.groups == 2 * len(actions), "a rule's regex has a capturing group"
    dotted = f"(?:{abbrev1}|{abbrev4[0]}\\.|{abbrev3}|(?:pt(?-i:[eyEY])|co)\\.|[A-Za-z]\\.)"
    dotted_abbreviation = re.compile(_case_sensitive_classes(dotted), re.IGNORECASE)
    return _Scanner(pattern, tuple(actions), tuple(names), dotted_abbreviation)


def _case_sensitive_classes(pattern: str) -> str:
    """Wrap every [...] class of `pattern` in (?-i:...).

    JFlex's caseless mode leaves character classes alone, while Python's IGNORECASE also
    applies to them (and even lets [A-Za-z] match the dotless/dotted i, long s and Kelvin sign).
    """
    out, i, n = [], 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            out.append(pattern[i : i + 2])
            i += 2
        elif ch == "[":
            j = i + 1
            if j < n and pattern[j] == "^":
                j += 1
            if j < n and pattern[j] == "]":  # a leading "]" is a member, not the end
                j += 1
            while pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            out.append(f"(?-i:{pattern[i : j + 1]})")
            i = j + 1
        else:
            out.append(ch)
            i += 1
    return "".join(out)


# Fast paths for the common cases, where the full rule set is known to give the same result
# (the differential tests against the Java tokenizer run with them):
# - an ASCII word followed by white space or the end, or by one of ",;:" or by a period and
#   then white space or the end: no rule matches anything longer there, and the rules that
#   match as long all return the word itself, except for the contractions of the "gonna"
#   kind and, before a period, the abbreviations (`_Scanner.dotted_abbreviation`);
# - one of ",;:!?." followed by white space (but ". . ." is an ellipsis) or the end.
_FAST_WORD = re.compile(r"[A-Za-z][A-Za-z0-9]*(?=(?:[,;:.]?)(?:[ \t\n]|\Z))")
_FAST_PUNCT = re.compile(r"[,;:!?]|\.(?![ \u00a0]\.)(?=[ \t\n]|\Z)")
_FAST_SPACE = re.compile(r"[ \t]+")
_NOT_FAST = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])


def _scan(text: str) -> list[str | None]:
    """PTB-tokenize `text`; None marks a line end. Tokens keep their case."""
    scanner = _scanner()
    out: list[str | None] = []
    pos, n = 0, len(text)
    while pos < n:
        m = _FAST_SPACE.match(text, pos)
        if m:
            pos = m.end()
            continue
        m = _FAST_WORD.match(text, pos)
        if m:
            word = m.group()
            period = text.startswith(".", m.end())
            if word.lower() not in _NOT_FAST and not (
                period and scanner.dotted_abbreviation.fullmatch(word + ".")
            ):
                out.append(word)
                pos = m.end()
                continue
        m = _FAST_PUNCT.match(text, pos)
        if m and (m.end() == n or text[m.end()] in " \t\n"):
            out.append(m.group())
            pos = m.end()
            continue
        groups = scanner.pattern.match(text, pos).groups()
        best_len, best = 0, -1
        for i in range(len(scanner.actions)):
            token = groups[2 * i]
            if token is not None and len(token) + len(groups[2 * i + 1]) > best_len:
                # strictly longer only: on a tie the earlier rule wins, as in JFlex
                best_len, best = len(token) + len(groups[2 * i + 1]), i
        if best < 0 or not groups[2 * best]:
            pos += 1  # untokenizable character: the Java lexer drops it (with a warning)
            continue
        tokens, consumed = scanner.actions[best](groups[2 * best])
        out.extend(tokens)
        pos += consumed
    return out


def _finish(tokens: Sequence[str]) -> str:
    """The output line of the Java tokenizer (`-lowerCase`), post-processed as the toolkit does.

    The toolkit right-strips the line (Python's notion of white space, which includes the
    no-break spaces a URL token may end with), splits it on single spaces and drops the
    punctuation tokens.
    """
    line = " ".join(_from_utf16_units(tok).lower() for tok in tokens).rstrip()
    return " ".join(t for t in line.split(" ") if t not in PUNCTUATIONS)


def tokenize(caption: str) -> str:
    """Tokenize one caption as the COCO toolkit's PTBTokenizer would.

    Args:
        caption: raw caption text.

    Returns:
        Space-separated lowercased PTB tokens, punctuation tokens removed, e.g.
        "A man's guitar (red)." -> "a man 's guitar -lrb- red -rrb-". When the toolkit
        tokenizes many captions at once, the end of one caption can depend on the start of the
        next (see `tokenize_batch`); this function treats the caption as the whole text.
    """
    return tokenize_batch([caption])[0]


def tokenize_batch(captions: Sequence[str]) -> list[str]:
    """Tokenize captions exactly as the toolkit does for one dict: as lines of one text.

    Args:
        captions: raw captions, in the order the toolkit would write them (dict order of the
            ids, then each id's list order).

    Returns:
        One tokenized string per caption (see `tokenize`).
    """
    if not captions:
        return []
    text = _to_utf16_units("\n".join(_LINE_BREAKS.sub(" ", c) for c in captions))
    lines: list[list[str]] = [[]]
    for tok in _scan(text):
        if tok is None:
            lines.append([])
        else:
            lines[-1].append(tok)
    if len(lines) != len(captions):  # pragma: no cover - a scanner bug, not an input error
        raise AssertionError(f"tokenizer produced {len(lines)} lines for {len(captions)} captions")
    return [_finish(line) for line in lines]
