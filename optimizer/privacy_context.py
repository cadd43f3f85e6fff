"""Detectors for the personal data a pattern alone does not give away.

People paste credentials into support chats, give their date of birth to
"verify", type their name in lower case or in their own script, and link
their profiles. None of these has a checksum, so each is found by what
surrounds it (context) or by what random strings look like (shape and
entropy), and the detectors are biased towards the words support chat is
full of: order numbers, versions, prices, dates, file and product names must
survive (``bench/scrubber.py`` measures both sides on a keep-list).

=========  ==================================================================
type       how it is found
=========  ==================================================================
SECRET     a value after a credential cue ("my password is …", "api key:",
           "PIN", "Passwort ist", "mot de passe") that is not an ordinary
           word; known key shapes (``sk-live-…``, ``sk_live_…``, ``ghp_…``,
           ``xoxb-…``, ``AKIA…``, ``AIza…``, ``glpat-…``, ``whsec_…``, our own
           ``fwk_…``), JWTs,
           ``Bearer`` tokens, private-key blocks, URLs with a password in
           them (``postgres://user:pw@host``); any other 20+ character token
           mixing upper case, lower case and digits with high entropy and
           frequent character-class changes (UUIDs and pure hex such as
           commit hashes are kept unless a credential cue precedes them)
DOB        a date (numeric, ISO or with a month name) after a birth cue
           ("born", "date of birth", "DOB", "birthday", "geboren am", "né le")
PROFILE    the user slug of a profile URL (LinkedIn ``/in/…``, Facebook,
           X/Twitter, Instagram, GitHub, TikTok …, and ``/u/``, ``/users/``,
           ``/profile/``, ``/@…`` paths on any site); organisation and repo
           paths on GitHub are kept
NAME       (in addition to :mod:`optimizer.privacy`) lower-case names after
           "my name is", "name:", "call me", and known names after "this is",
           "I'm"; Chinese, Japanese and Korean names after their own cues
           (我叫, 我是 + a common surname, 私の名前は…です, …さん/様,
           제 이름은…입니다) and after English cues; Cyrillic, Greek, Arabic,
           Hebrew and Devanagari names after cues ("меня зовут")
=========  ==================================================================

Each detector yields ``(type, start, end)``; :mod:`optimizer.privacy` turns
them into entities and resolves overlaps.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections import Counter
from collections.abc import Iterator

__all__ = ["dates_of_birth", "looks_random", "names_in_context", "profile_slugs", "secrets_in"]

Span = tuple[str, int, int]

# -- SECRET -----------------------------------------------------------------

_CUE_WORDS = (
    r"password|passwort|passwd|pwd|pw|passphrase|passcode|pass|pin|mot de passe|contraseña|"
    r"senha|wachtwoord|kennwort|api[ _-]?key|secret(?: key)?|client secret|webhook secret|"
    r"access key|private key|auth token|access token|api token|token|2fa code|otp"
)
# The cue, optional "new/old/temporary" before it, then a connector ("is", ":", "=") or none.
_SECRET_CUE = re.compile(
    rf"\b(?:{_CUE_WORDS})(?![\w-])"
    r"(?P<conn>\s+(?:is|was|ist|war|est|es|era)\b\s*[:=]?|\s*[:=]|\s+[-–—]\s)?\s*",
    re.IGNORECASE,
)
_QUOTED = re.compile(r"[\"'“‘«]([^\"'”’»\n]{3,80})[\"'”’»]")
_VALUE = re.compile(r"[^\s]{3,200}")
_TRAILING = ".,;:)]}>'\"”’"


def _words(block: str) -> list[str]:
    return block.split()


# Words after "password is" that describe the password rather than being it.
_DESCRIPTIVE = frozenset(
    _words(
        """
    not wrong incorrect correct right too still being missing expired invalid required
    rejected accepted changed reset shown hidden visible displayed spelled misspelled saved
    stored case sensitive case-sensitive weak strong short long empty blank same different
    the a an my your our their this that it very also just now no yes ok okay fine working
    broken locked blocked forgotten lost gone there here field box form page link email
    mail manager policy rules requirements change changes update updated reset-link
    """
    )
)
_KNOWN_KEY = re.compile(
    r"(?<![\w-])(?:"
    r"(?:sk|pk|rk)[-_](?:live|test|proj)[-_][A-Za-z0-9_-]{8,}"
    r"|sk-[A-Za-z0-9_-]{20,}"
    r"|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}"
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"
    r"|AIza[0-9A-Za-z_-]{30,}"
    r"|glpat-[A-Za-z0-9_-]{16,}"
    r"|whsec_[A-Za-z0-9]{16,}"
    r"|fwk_[0-9a-f]{12}_[A-Za-z0-9_-]{20,}"
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{8,}"
    r")"
)
_BEARER = re.compile(r"\bBearer\s+([A-Za-z0-9._~+/=-]{16,})")
_PRIVATE_KEY = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)", re.DOTALL
)
# scheme://user:password@host… — the whole URL goes (host names of internal systems too).
_CREDENTIAL_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]{1,20}://[^\s:/@]*:[^\s/@]+@[^\s\"'<>]+")
_TOKEN = re.compile(r"(?<![\w/.@:-])[A-Za-z0-9_+=-]{20,}(?![\w/@:-]|\.\w)")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_HEX = re.compile(r"^[0-9a-fA-F]+$")


@functools.lru_cache(maxsize=1)
def _common_words() -> frozenset[str]:
    """Ordinary English words (faker's lorem list, packaged data) plus descriptive ones."""
    try:
        from faker.providers.lorem.en_US import Provider

        words = {w.lower() for w in Provider.word_list}
    except ImportError:  # pragma: no cover - faker is a dependency
        words = set()
    return frozenset(words | _DESCRIPTIVE)


def _entropy(token: str) -> float:
    counts = Counter(token)
    n = len(token)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def _class(ch: str) -> int:
    return 0 if ch.islower() else 1 if ch.isupper() else 2 if ch.isdigit() else 3


def looks_random(token: str) -> bool:
    """A 20+ character token that reads like a generated key, not an id or a file name.

    Random keys mix upper case, lower case and digits and switch between them
    at about every other character; ids (``ORD-2024-118833``), file stems
    (``ProjectPlanner_v2_FINAL``) and codes (``ERR_CONN_RESET_0x80072EFD``)
    switch rarely or lack a class.
    """
    core = token.strip("=")
    if len(core) < 20 or _UUID.match(core) or _HEX.match(core):
        return False
    if not (
        any(c.islower() for c in core)
        and any(c.isupper() for c in core)
        and any(c.isdigit() for c in core)
    ):
        return False
    # Separators do not count as changes: "ProjectPlanner_v2_FINAL" is four words, not noise.
    letters = re.sub(r"[-_+=]", "", core)
    switches = sum(_class(a) != _class(b) for a, b in itertools.pairwise(letters))
    return switches / (len(letters) - 1) >= 0.3 and _entropy(core) >= 3.5


def _after_cue(text: str, cue: re.Match[str]) -> tuple[int, int] | None:
    """The value a credential cue introduces, or None when the words after it describe it."""
    pos = cue.end()
    if pos >= len(text):
        return None
    if quoted := _QUOTED.match(text, pos):
        return quoted.start(1), quoted.end(1)
    m = _VALUE.match(text, pos)
    if m is None:
        return None
    s, e = m.start(), m.end()
    while e > s and text[e - 1] in _TRAILING:
        e -= 1
    value = text[s:e]
    if len(value) < 3 or value.lower() in _common_words():
        return None
    has_other = any(not c.isalpha() for c in value) or any(c.isupper() for c in value[1:])
    cue_word = cue.group().split()[0].lower().rstrip(":=")
    if cue_word in ("pin", "passcode", "2fa", "otp"):
        return (s, e) if value.isdigit() and 4 <= len(value) <= 8 else None
    if cue.group("conn") is None and not has_other:
        return None  # "password reset", "token scopes": a noun phrase, not a value
    if cue_word in ("token", "pass") and not has_other:
        return None
    return s, e


def secrets_in(text: str) -> Iterator[Span]:
    """Credentials: by cue, by known key shape, by URL with a password, by entropy."""
    for cue in _SECRET_CUE.finditer(text):
        if (span := _after_cue(text, cue)) is not None:
            yield ("SECRET", *span)
    for pattern in (_KNOWN_KEY, _PRIVATE_KEY):
        for m in pattern.finditer(text):
            yield ("SECRET", m.start(), m.end())
    for m in _BEARER.finditer(text):
        yield ("SECRET", m.start(1), m.end(1))
    for m in _CREDENTIAL_URL.finditer(text):
        e = m.end()
        while e > m.start() and text[e - 1] in _TRAILING:
            e -= 1
        yield ("SECRET", m.start(), e)
    for m in _TOKEN.finditer(text):
        if looks_random(m.group()):
            yield ("SECRET", m.start(), m.end())


# -- DOB --------------------------------------------------------------------

_MONTH = (
    r"(?:jan(?:uary|uar)?|feb(?:ruary|ruar)?|mar(?:ch)?|märz|apr(?:il)?|may|mai|june?|juni|"
    r"july?|juli|aug(?:ust)?|sep(?:t(?:ember)?)?|oct(?:ober)?|okt(?:ober)?|nov(?:ember)?|"
    r"dec(?:ember)?|dez(?:ember)?)\.?"
)
_DATE = (
    rf"(?:\d{{4}}-\d{{1,2}}-\d{{1,2}}|\d{{1,2}}[./-]\d{{1,2}}[./-](?:\d{{4}}|\d{{2}})"
    rf"|\d{{1,2}}(?:st|nd|rd|th)?\.?\s+(?:of\s+)?{_MONTH}\s*,?\s+\d{{4}}"
    rf"|{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}})"
)
_DOB = re.compile(
    r"(?:\bdate of birth|\bd\.o\.b\.?|\bdob|\bbirth\s?date|\bbirthday|\bborn(?:\s+on)?|"
    r"\bgeboren(?:\s+am)?|\bgeburtsdatum|\bnée?\s+le|\bfecha de nacimiento|\bnacid[oa] el|"
    r"\bdata di nascita|\bnat[oa] il)"
    rf"(?![a-z])[^\n\d]{{0,16}}?({_DATE})(?!\d)",
    re.IGNORECASE,
)


def dates_of_birth(text: str) -> Iterator[Span]:
    """A date right after a birth cue; other dates (orders, renewals) stay."""
    for m in _DOB.finditer(text):
        yield ("DOB", m.start(1), m.end(1))


# -- PROFILE ----------------------------------------------------------------

_PROFILE_SITES = (
    r"linkedin\.com/(?:in|pub)|facebook\.com|fb\.com|twitter\.com|x\.com|instagram\.com|"
    r"github\.com|gitlab\.com|tiktok\.com|youtube\.com/(?:c|user)|threads\.net|pinterest\.com|"
    r"reddit\.com/(?:u|user)|t\.me|vk\.com|medium\.com|behance\.net|dribbble\.com"
)
_PROFILE = re.compile(
    rf"(?:https?://)?(?:www\.|m\.|[a-z]{{2}}\.)?(?:{_PROFILE_SITES})/(@?[A-Za-z0-9_.-]+)(/[^\s]*)?",
    re.IGNORECASE,
)
_PROFILE_PATH = re.compile(
    r"(?:https?://)?[a-z0-9.-]+\.[a-z]{2,}/(?:u|user|users|profile|profiles|people|members?|@)/?"
    r"(@?[A-Za-z0-9_.-]+)",
    re.IGNORECASE,
)
_NOT_A_USER = frozenset(
    _words(
        """
    about pricing features login signup settings help home share sharer intent search explore
    marketplace orgs organizations topics hashtag p pages groups events watch company jobs docs
    policies privacy terms legal blog status apps enterprise sponsors notifications i hashtags
    """
    )
)
# On code hosts a second path segment means a repository (an organisation's, usually).
_CODE_HOSTS = ("github.com", "gitlab.com")


def profile_slugs(text: str) -> Iterator[Span]:
    """The user slug of a profile URL; the site and the rest of the URL stay."""
    for m in _PROFILE.finditer(text):
        slug_s, slug_e = m.span(1)
        while slug_e > slug_s and text[slug_e - 1] in "._-":
            slug_e -= 1
        slug = text[slug_s:slug_e].lstrip("@").lower()
        rest = (m.group(2) or "").strip("/")
        if not slug or slug in _NOT_A_USER:
            continue
        if rest and any(h in m.group().lower() for h in _CODE_HOSTS):
            continue  # github.com/org/repo: a project, not a person
        yield ("PROFILE", slug_s, slug_e)
    for m in _PROFILE_PATH.finditer(text):
        slug_s, slug_e = m.span(1)
        while slug_e > slug_s and text[slug_e - 1] in "._-":
            slug_e -= 1
        if slug_e > slug_s:
            yield ("PROFILE", slug_s, slug_e)


# -- NAME (beyond capitalised Latin words) ----------------------------------

_CJK = r"\u3400-\u4dbf\u4e00-\u9fff"
_KANA = r"\u30a0-\u30ff"
_HANGUL = r"\uac00-\ud7a3"
# Cyrillic, Greek, Armenian, Hebrew, Arabic, Devanagari, Thai, Georgian letters.
_OTHER = (
    r"\u0370-\u03ff\u0400-\u04ff\u0530-\u058f\u0590-\u05ff"
    r"\u0600-\u06ff\u0900-\u097f\u0e00-\u0e7f\u10a0-\u10ff"
)
_OTHER_WORD = rf"[{_OTHER}]+"
_FOREIGN_RUN = rf"(?:[{_CJK}{_KANA}{_HANGUL}]{{1,6}}|{_OTHER_WORD}(?:\s+{_OTHER_WORD}){{0,2}})"
_ENGLISH_CUE = re.compile(
    r"(?:\bmy name is|\bmy name's|\bname\s*:|\bcall me|\bI'm|\bI’m|\bI am|\bthis is|\bhi|"
    r"\bhello|\bhey|\bdear|\bsigned,?|\bregards,?|\bthanks,?)\s*,?\s*" + rf"({_FOREIGN_RUN})",
    re.IGNORECASE,
)
_LOWER_STRONG = re.compile(
    r"(?:\bmy name is|\bmy name's|\bname\s*:|\bcall me|\bsigned,?)\s+"
    r"([a-zà-öø-ÿ][a-zà-öø-ÿ'-]+)(?:\s+([a-zà-öø-ÿ][a-zà-öø-ÿ'-]+))?",
    re.IGNORECASE,
)
# "this is priya from accounts": an unknown lower-case word introduced as a person.
_LOWER_INTRO = re.compile(
    r"\bthis is\s+([a-zà-öø-ÿ][a-zà-öø-ÿ'-]+)(?=\s+(?:from|here|speaking|with|at)\b)"
)
_LOWER_WEAK = re.compile(
    r"(?:\bthis is|\bi'm|\bi’m|\bim|\bi am|\bhi|\bhello|\bhey)\s+"
    r"([a-zà-öø-ÿ][a-zà-öø-ÿ'-]+)(?:\s+([a-zà-öø-ÿ][a-zà-öø-ÿ'-]+))?",
    re.IGNORECASE,
)
# The hundred commonest Chinese surnames: after 我是 ("I am") a name must start with one.
_CN_SURNAMES = (
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕"
    "丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃"
    "武戴莫孔向汤"
)
_ZH_STRONG = re.compile(
    rf"(?:我叫|我的名字是|我的名字叫|名字[是叫：:]|姓名[是：:]?|叫我)\s*([{_CJK}]{{2,3}})"
)
_ZH_WEAK = re.compile(rf"我是\s*([{_CN_SURNAMES}][{_CJK}]{{1,2}})")
_JA_CUE = re.compile(
    rf"(?:私の名前は|名前は|わたしは|私は)\s*([{_CJK}{_KANA}]{{2,6}}?)(?:です|と申します|といいます)"
)
_JA_HONORIFIC = re.compile(
    rf"(?<![おご])([{_CJK}{_KANA}]{{2,4}})(?:さん|様|さま|くん|ちゃん|先生|氏)"
)
_KO_CUE = re.compile(
    rf"(?:제 이름은|내 이름은|이름은|저는)\s*([{_HANGUL}]{{2,4}}?)"
    r"(?:입니다|이에요|예요|이고|라고|이라고)"
)
_RU_CUE = re.compile(
    rf"(?i:меня зовут|моё имя|мое имя|имя:)\s+([{_OTHER}][{_OTHER}]*(?:\s+[{_OTHER}]+)?)",
)


def names_in_context(text: str, first: frozenset[str], last: frozenset[str]) -> Iterator[Span]:
    """Names the capitalised-word detector cannot see; ``first``/``last`` are known names."""
    common = _common_words()
    for m in _LOWER_STRONG.finditer(text):
        words = [g for g in (m.group(1), m.group(2)) if g]
        n = 0
        for w in words:
            known = w.capitalize() in first or w.capitalize() in last
            if (w.lower() in common and not known) or (w[0].isupper() and n == 0):
                break  # "my name is on the invoice"; capitalised words are the main detector's
            n += 1
        if n:
            yield ("NAME", m.start(1), m.end(n))
    for m in _LOWER_WEAK.finditer(text):
        if not m.group(1).islower():
            continue
        if m.group(1).capitalize() not in first or m.group(1).lower() in common:
            continue  # "I'm sorry", "this is urgent": only known first names
        end = m.end(1)
        if m.group(2) and m.group(2).islower() and m.group(2).capitalize() in last:
            end = m.end(2)
        yield ("NAME", m.start(1), end)
    for m in _LOWER_INTRO.finditer(text):
        if m.group(1) not in common:
            yield ("NAME", m.start(1), m.end(1))
    for pattern in (_ENGLISH_CUE, _ZH_STRONG, _ZH_WEAK, _JA_CUE, _JA_HONORIFIC, _KO_CUE, _RU_CUE):
        for m in pattern.finditer(text):
            yield ("NAME", m.start(1), m.end(1))
