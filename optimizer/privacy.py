"""Find personal data in text and replace it with typed placeholders.

No user text enters the example bank, an export or a Langfuse mask without
passing :func:`scrub`. Each entity type has its own detector; candidates that
overlap are resolved longest-first (then by the order of :data:`ENTITY_TYPES`),
and each survivor is replaced by ``<TYPE>``.

=========  ==================================================================
type       how it is found
=========  ==================================================================
EMAIL      address pattern, plus "name at domain dot com" spellings
PHONE      ``phonenumbers.PhoneNumberMatcher`` over :data:`PHONE_REGIONS`;
           plain digit runs only after a phone cue ("call", "mobile" …),
           nothing right after an order/ticket/invoice cue
CARD       13–19 digits, Luhn-valid, with a known card-network prefix
IBAN       ``stdnum.iban`` check digits
IP         ``ipaddress`` (v4 and v6), not after "version"/"section" cues
ADDRESS    house number + street words + street suffix (English, German,
           Dutch, French, Spanish, Italian forms), units, city, ZIP/postcode;
           PO boxes; postcodes after a "postcode" cue
GOV_ID     ``python-stdnum`` validators (US SSN/ITIN, DE IdNr/St.-Nr., FR NIR,
           ES DNI/NIE, IT codice fiscale, NL BSN, CA SIN, IN Aadhaar/PAN) and
           UK NINO rules; bare digit runs and passport/licence numbers only
           after a cue naming the document
NAME       first/last name lists of the PyPI package ``faker`` (many locales)
           plus cues: titles (Mr, Dr …), "my name is", "I'm", greetings,
           sign-offs; first names that are common English words ("Will",
           "May", "Grace") count only with a cue or a known surname; lower
           case and non-Latin names by context (:mod:`optimizer.privacy_context`)
SECRET     passwords after a cue, API keys, JWTs, tokens, connection strings
           (:mod:`optimizer.privacy_context`)
DOB        a date after a birth cue
PROFILE    the user slug of a profile URL
=========  ==================================================================

No model is downloaded: the name lists ship inside ``faker``. Measured
precision and recall per type are printed by ``bench/scrubber.py``.

>>> scrub("Hi, I'm Anna Schmidt, call me on +49 30 901820 or anna@example.org")
"Hi, I'm <NAME>, call me on <PHONE> or <EMAIL>"
>>> scrub("Order #4155552671 costs $1,299.00 and ships on 2024-03-15.")
'Order #4155552671 costs $1,299.00 and ships on 2024-03-15.'
"""

from __future__ import annotations

import functools
import importlib
import ipaddress
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import phonenumbers
from stdnum import iban as stdnum_iban
from stdnum import luhn

from optimizer import privacy_context

__all__ = [
    "ENTITY_TYPES",
    "PHONE_REGIONS",
    "SCRUBBER_VERSION",
    "Entity",
    "Scrubber",
    "find_entities",
    "public_allowlist",
    "scrub",
]

log = logging.getLogger(__name__)

#: Bumped whenever detection changes, and recorded in every export manifest.
SCRUBBER_VERSION = "1.1"

#: Entity types, in the order that breaks ties between overlapping equal-length candidates.
ENTITY_TYPES = (
    "SECRET", "EMAIL", "IBAN", "CARD", "GOV_ID", "IP", "PHONE", "DOB", "ADDRESS", "PROFILE", "NAME",
)  # fmt: skip

#: Regions whose national formats phone numbers are looked for in (``+…`` works from any).
PHONE_REGIONS = ("US", "GB", "DE", "FR", "ES", "IT", "NL", "IN", "AU", "BR", "IE", "PL")

# Regions where a nationally written number starts with its trunk prefix "0";
# a number there without it is more likely an id than a phone number.
_TRUNK_ZERO = frozenset({"GB", "DE", "FR", "NL", "AU", "IE"})

_RANK = {t: i for i, t in enumerate(ENTITY_TYPES)}


@dataclass(frozen=True)
class Entity:
    """A span of personal data: ``text == source[start:end]``."""

    type: str
    start: int
    end: int
    text: str


# -- helpers ----------------------------------------------------------------


def _before(text: str, start: int, width: int = 32) -> str:
    return text[max(0, start - width) : start].lower()


def _last_cue(pattern: re.Pattern[str], window: str) -> int:
    """End offset of the last cue in ``window`` (-1 if none)."""
    end = -1
    for m in pattern.finditer(window):
        end = m.end()
    return end


# -- EMAIL ------------------------------------------------------------------

_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+([A-Za-z]{2,24})(?![\w-])"
)
# File names such as logo@2x.png are not addresses.
_FILE_SUFFIXES = frozenset({"png", "jpg", "jpeg", "gif", "svg", "webp", "pdf", "ico", "bmp"})
_EMAIL_SPELLED = re.compile(
    r"(?<![\w.])[A-Za-z0-9][\w.+-]*(?:\s+dot\s+[A-Za-z0-9][\w+-]*)*"
    r"(?:\s*(?:\[at\]|\(at\)|\{at\})\s*|\s+at\s+)"
    r"[A-Za-z0-9][\w-]*(?:(?:\s*(?:\[dot\]|\(dot\)|\{dot\})\s*|\s+dot\s+)(?:com|org|net|edu|gov|io|co|uk|de|fr|es|it|nl|"
    r"ch|at|be|pl|in|au|ca|us|eu|me|info|biz|[a-z]{2})\b)+",
    re.IGNORECASE,
)


def _emails(text: str) -> Iterator[Entity]:
    for m in _EMAIL.finditer(text):
        if m.group(1).lower() not in _FILE_SUFFIXES:
            yield Entity("EMAIL", m.start(), m.end(), m.group())
    for m in _EMAIL_SPELLED.finditer(text):
        yield Entity("EMAIL", m.start(), m.end(), m.group())


# -- PHONE ------------------------------------------------------------------

_PHONE_CUE = re.compile(
    r"\b(?:phone|tel|telephone|call|called|calling|ring|mobile|cell|cellphone|handy|handynummer|"
    r"telefon|telefonu|numéro|fax|whatsapp|sms|text me|reach me|landline|my number|direct line|"
    r"dial|hotline|mob)\b"
)
_NOT_PHONE_CUE = re.compile(
    r"(?:\b(?:order|orders|invoice|ticket|case|ref|reference|tracking|transaction|acct|account|"
    r"booking|confirmation|receipt|serial|sku|item|id|code|workspace|customer|member|isbn|"
    r"bestellnummer|rechnung|kundennummer|auftrag)\b|#)"
)


def _phone_leniencies(text: str) -> tuple[Any, ...]:
    # With a phone cue anywhere, numbers that merely look possible are accepted
    # too (people mistype and invent numbers, which are still theirs to hide).
    if _PHONE_CUE.search(text.lower()):
        return (phonenumbers.Leniency.VALID, phonenumbers.Leniency.POSSIBLE)
    return (phonenumbers.Leniency.VALID,)


def _phones(text: str, regions: Iterable[str]) -> Iterator[Entity]:
    if sum(ch.isdigit() for ch in text) < 6:
        return
    seen: set[tuple[int, int]] = set()
    leniencies = _phone_leniencies(text)
    for region in regions:
        for leniency in leniencies:
            for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=leniency):
                span = (match.start, match.end)
                if span in seen:
                    continue
                if _accept_phone(text, match.start, match.raw_string, region, leniency):
                    seen.add(span)
                    yield Entity("PHONE", match.start, match.end, match.raw_string)


_DATE_LIKE = re.compile(r"^(?:\d{1,2}[./-]\d{1,2}[./-]\d{2,4}|\d{4}[./-]\d{1,2}[./-]\d{1,2})$")


def _accept_phone(text: str, start: int, raw: str, region: str, leniency: Any) -> bool:
    if _DATE_LIKE.match(raw):
        return False
    window = _before(text, start)
    cue, anti = _last_cue(_PHONE_CUE, window), _last_cue(_NOT_PHONE_CUE, window)
    if anti > cue:  # "order 4155552671", "Ticket 2024-0315-7781": the nearest cue says id
        return False
    if cue >= 0:
        return True
    if leniency != phonenumbers.Leniency.VALID:
        return False
    international = raw.startswith(("+", "00"))
    if not international and raw.isdigit():  # a bare digit run needs a phone cue
        return False
    return international or region not in _TRUNK_ZERO or raw.lstrip("(").startswith("0")


# -- CARD -------------------------------------------------------------------

_DIGIT_GROUPS = re.compile(r"(?<![\w-])\d+(?:[ -]\d+)*(?![\w-])")
_CARD_PREFIX = re.compile(
    r"^(?:4|5[1-5]|2(?:2[2-9]|[3-6]\d|7[01]|720)|3[47]|3(?:0[0-5]|[689])|6(?:011|5|4[4-9]|2)|35"
    r"|50|5[6-9]|6\d)"
)


def _cards(text: str) -> Iterator[Entity]:
    # A card's digit groups may sit next to other numbers ("… 1111 12/27"):
    # try every run of whole groups, longest first.
    for m in _DIGIT_GROUPS.finditer(text):
        if _NOT_PHONE_CUE.search(_before(text, m.start(), 16)):
            continue
        groups = [(g.start(), g.end()) for g in re.finditer(r"\d+", m.group())]
        best: tuple[int, int] | None = None
        for i in range(len(groups)):
            for j in range(len(groups) - 1, i - 1, -1):
                s, e = groups[i][0], groups[j][1]
                digits = re.sub(r"\D", "", m.group()[s:e])
                if 13 <= len(digits) <= 19 and _CARD_PREFIX.match(digits) and luhn.is_valid(digits):
                    if best is None or e - s > best[1] - best[0]:
                        best = (s, e)
                    break
        if best is not None:
            s, e = m.start() + best[0], m.start() + best[1]
            yield Entity("CARD", s, e, text[s:e])


# -- IBAN -------------------------------------------------------------------

_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]){11,32}")


def _ibans(text: str) -> Iterator[Entity]:
    for m in _IBAN.finditer(text):
        raw = m.group()
        # Greedy matching may run into the next word: shorten until the check digits agree.
        ends = [i + 1 for i, ch in enumerate(raw) if ch != " "]
        for end in reversed(ends):
            candidate = raw[:end]
            compact = candidate.replace(" ", "").upper()
            if len(compact) < 15:
                break
            if end < len(raw) and raw[end].isalnum() and raw[end - 1] != " " and " " in candidate:
                continue  # never split a space-separated group in the middle
            if stdnum_iban.is_valid(compact):
                yield Entity("IBAN", m.start(), m.start() + end, candidate)
                break


# -- IP ---------------------------------------------------------------------

_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
_IPV6 = re.compile(
    r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?![\w:]|\.\w)"
)
_NOT_IP_CUE = re.compile(
    r"(?:\b(?:version|ver|v|build|release|section|chapter|clause|step|rule|§)\.?\s*$)"
)


def _ips(text: str) -> Iterator[Entity]:
    for m in _IPV4.finditer(text):
        if _NOT_IP_CUE.search(_before(text, m.start(), 20)):
            continue
        try:
            ipaddress.IPv4Address(m.group())
        except ValueError:
            continue
        yield Entity("IP", m.start(), m.end(), m.group())
    for m in _IPV6.finditer(text):
        raw = m.group()
        if sum(c in "0123456789abcdefABCDEF" for c in raw) < 2:
            continue
        try:
            ipaddress.IPv6Address(raw)
        except ValueError:
            continue
        yield Entity("IP", m.start(), m.end(), raw)


# -- ADDRESS ----------------------------------------------------------------

_CAP = r"[A-ZÀ-ÖØ-Þ][\wÀ-ÖØ-öø-ÿ'’.-]*"
_EN_SUFFIX = (
    r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Place|Pl|Terrace|"
    r"Way|Square|Sq|Parkway|Pkwy|Highway|Hwy|Circle|Cir|Crescent|Close|Gardens|Grove|Row|Mews|"
    r"Loop|Trail|Walk|Alley|Plaza|Hill|Park)\b\.?"
)
_DIRECTION = r"(?:\s+(?:N|S|E|W|NE|NW|SE|SW|North|South|East|West)\b)?"
_UNIT = r"(?:,?\s+(?:Apt|Apartment|Suite|Ste|Unit|Flat|Floor|Fl|Room|#)\.?\s*[\w-]+)"
_LEAD_UNIT = r"(?:(?:Apt|Apartment|Suite|Ste|Unit|Flat)\.?\s*[\w-]+\s*,\s*)?"
_UK_POSTCODE = r"[A-Z]{1,2}\d[A-Z\d]?\s?\d[A-Z]{2}"
_CA_POSTCODE = r"[A-Z]\d[A-Z]\s?\d[A-Z]\d"
_CITYWORD = r"[A-ZÀ-ÖØ-Þ][a-zà-öø-ÿ][\wÀ-ÖØ-öø-ÿ'’.-]*"
_CITY = rf"{_CITYWORD}(?:\s+{_CITYWORD}){{0,2}}"
_CITY_TAIL = (
    rf"(?:,\s*{_CITY}(?:,?\s+(?:[A-Z]{{2}}\s+\d{{5}}(?:-\d{{4}})?|[A-Z]{{2}}\s+{_CA_POSTCODE}|[A-Z]{{2}}\b|{_UK_POSTCODE}"
    rf"|{_CA_POSTCODE}|\d{{4}}\b|\d{{1,2}}\b))?"
    rf"|,?\s+{_UK_POSTCODE})?"
)
_EU_CITY_TAIL = (
    rf"(?:,?\s+(?:\d{{4,5}}|\d{{4}}\s?[A-Z]{{2}})\s+{_CAP}(?:\s+{_CAP})?|,\s*{_CITYWORD})?"
)
_EN_STREET = (
    rf"\b\d{{1,5}}[A-Za-z]?(?:[-/]\d{{1,4}})?\s+(?:{_CAP}\s+){{1,3}}{_EN_SUFFIX}{_DIRECTION}"
)
_ADDRESS_PATTERNS = [
    # "Apt 4B, 55 Water St, Brooklyn, NY 11201" / "350 Fifth Avenue, Suite 3300, New York, NY 10118"
    re.compile(rf"{_LEAD_UNIT}{_EN_STREET}{_UNIT}?{_CITY_TAIL}"),
    # "number + capitalised words, City, ST 12345" (US streets without a suffix: "2500 Broadway")
    re.compile(
        rf"\b\d{{1,5}}\s+(?:{_CAP}\s+){{0,3}}{_CAP},\s*{_CITY},\s*[A-Z]{{2}}\s+\d{{5}}(?:-\d{{4}})?\b"
    ),
    # "Hauptstraße 5, 10115 Berlin", "Kerkstraat 12", "Königsallee 92"
    re.compile(
        rf"\b[A-ZÄÖÜ][\wäöüßéè-]*(?:straße|strasse|str\.|gasse|weg|platz|allee|ring|damm|ufer|"
        rf"straat|laan|gracht|plein|kade|steeg)\s+\d{{1,4}}\s?[a-zA-Z]?\b{_EU_CITY_TAIL}"
    ),
    re.compile(
        rf"\b(?:Am|An der|Auf der|Im|In der|Zum|Zur)\s+{_CAP}\s+\d{{1,4}}\s?[a-z]?\b,?"
        rf"\s+\d{{5}}\s+{_CAP}"
    ),
    # "12 rue de la Paix, 75002 Paris"
    re.compile(
        rf"\b\d{{1,4}}(?:\s?(?:bis|ter))?,?\s+(?:rue|avenue|av\.|boulevard|bd|place|chemin|allée|impasse|"
        rf"quai|cours|route)\s+(?:(?:de|du|des|la|le|l'|d')\s*)*{_CAP}(?:\s+{_CAP}){{0,3}}{_EU_CITY_TAIL}",
        re.IGNORECASE,
    ),
    # "Calle Mayor 5, 28013 Madrid", "Via Roma 10, 00184 Roma"
    re.compile(
        rf"\b(?:Calle|Avenida|Av\.|Plaza|Paseo|Carrer|Rua|Via|Viale|Piazza|Corso|Largo)\s+"
        rf"(?:(?:de|del|della|di|la|dos|das)\s+)*{_CAP}(?:\s+{_CAP}){{0,2}},?\s+\d{{1,4}}{_EU_CITY_TAIL}"
    ),
    re.compile(rf"\bP\.?\s?O\.?\s+Box\s+\d+{_CITY_TAIL}", re.IGNORECASE),
]
_POSTCODE_CUE = re.compile(
    rf"\b(?:post\s?code|postal code|zip(?: code)?|plz)\b(?:\s+is)?\s*:?\s*"
    rf"({_UK_POSTCODE}|{_CA_POSTCODE}|\d{{5}}(?:-\d{{4}})?)",
    re.IGNORECASE,
)


def _addresses(text: str) -> Iterator[Entity]:
    for pattern in _ADDRESS_PATTERNS:
        for m in pattern.finditer(text):
            s, e = m.start(), m.end()
            while (
                e > s and text[e - 1] in " ,."
            ):  # "123 Main St." keeps the dot out unless abbreviating
                if text[e - 1] == "." and re.search(
                    r"\b(?:St|Ave|Rd|Dr|Blvd|Ln|Ct|Pl|Sq|str)\.$", text[s:e]
                ):
                    e -= 1
                    break
                e -= 1
            yield Entity("ADDRESS", s, e, text[s:e])
    for m in _POSTCODE_CUE.finditer(text):
        yield Entity("ADDRESS", m.start(1), m.end(1), m.group(1))


# -- GOV_ID -----------------------------------------------------------------


def _valid(module: str) -> Callable[[str], bool]:
    mod = importlib.import_module(f"stdnum.{module}")
    return lambda value: bool(mod.is_valid(value))


_ID_CUE = re.compile(
    r"\b(?:ssn|social security(?: number| no\.?)?|itin|national insurance(?: number| no\.?)?|"
    r"ni number|nino|passport(?: number| no\.?| nr\.?| #)?|reisepass(?:nummer)?|"
    r"pass(?:nummer|port)|"
    r"driver'?s? licen[cs]e(?: number| no\.?)?|driving licen[cs]e(?: number| no\.?)?|"
    r"licen[cs]e number|national id(?: number)?|id card(?: number)?|identity card(?: number)?|"
    r"personalausweis(?:nummer)?|ausweisnummer|steuer-?id|steuer-identifikationsnummer|"
    r"steueridentifikationsnummer|identifikationsnummer|idnr|steuernummer|tax id|tax number|tin|"
    r"bsn|burgerservicenummer|sin|social insurance(?: number)?|aadhaa?r(?: number| no\.?)?|"
    r"pan(?: card| number)?|"
    r"dni|nie|nir|codice fiscale|personnummer|pesel|cpr|curp)\b(?:\s*(?:is|:|=|#|-))*\s*",
    re.IGNORECASE,
)
_NINO = re.compile(
    r"\b(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b"
)
# (pattern, validator on the compact value, needs a cue)
_ID_PATTERNS: list[tuple[re.Pattern[str], Callable[[str], bool], bool]] = [
    (
        re.compile(r"\b\d{3}-\d{2}-\d{4}\b"),
        lambda v: _valid("us.ssn")(v) or _valid("us.itin")(v),
        False,
    ),
    (re.compile(r"\b\d{3} \d{2} \d{4}\b|\b\d{9}\b"), lambda v: _valid("us.ssn")(v), True),
    (_NINO, lambda v: True, False),
    (re.compile(r"\b\d{2} ?\d{3} ?\d{3} ?\d{3}\b"), _valid("de.idnr"), True),
    (re.compile(r"\b\d{2,3}/\d{3,4}/\d{4,5}\b"), _valid("de.stnr"), False),
    (
        re.compile(r"\b[12] ?\d{2} ?\d{2} ?(?:\d{2}|2[AB]) ?\d{3} ?\d{3} ?\d{2}\b"),
        _valid("fr.nir"),
        False,
    ),
    (re.compile(r"\b\d{8}-?[A-Z]\b"), _valid("es.dni"), False),
    (re.compile(r"\b[XYZ]-?\d{7}-?[A-Z]\b"), _valid("es.nie"), False),
    (
        re.compile(r"\b[A-Z]{6}\d{2}[A-EHLMPR-T]\d{2}[A-Z]\d{3}[A-Z]\b"),
        _valid("it.codicefiscale"),
        False,
    ),
    (re.compile(r"\b\d{4}\.?\d{2}\.?\d{3}\b"), _valid("nl.bsn"), True),
    (re.compile(r"\b\d{3}[ -]?\d{3}[ -]?\d{3}\b"), _valid("ca.sin"), True),
    (re.compile(r"\b[2-9]\d{3} \d{4} \d{4}\b"), _valid("in_.aadhaar"), False),
    (re.compile(r"\b[2-9]\d{11}\b"), _valid("in_.aadhaar"), True),
    (re.compile(r"\b[A-Z]{3}[ABCFGHLJPT][A-Z]\d{4}[A-Z]\b"), _valid("in_.pan"), False),
]
_ID_CHUNK = re.compile(r"[A-Za-z0-9]+")


def _gov_ids(text: str) -> Iterator[Entity]:
    for pattern, valid, needs_cue in _ID_PATTERNS:
        for m in pattern.finditer(text):
            if needs_cue and not _ID_CUE.search(_before(text, m.start(), 40)):
                continue
            if valid(re.sub(r"[\s./-]", "", m.group())):
                yield Entity("GOV_ID", m.start(), m.end(), m.group())
    # Any document number written right after a cue naming the document.
    for cue in _ID_CUE.finditer(text):
        span = _id_token(text, cue.end())
        if span is not None:
            yield Entity("GOV_ID", span[0], span[1], text[span[0] : span[1]])


def _id_token(text: str, pos: int) -> tuple[int, int] | None:
    """The id right after a cue: alphanumeric chunks joined by single spaces/dashes."""
    end, digits = pos, 0
    while True:
        m = _ID_CHUNK.match(text, end)
        if m is None:
            break
        chunk = m.group()
        has_digit = any(c.isdigit() for c in chunk)
        if not has_digit and not (len(chunk) <= 2 and chunk.isupper()):
            break
        digits += sum(c.isdigit() for c in chunk)
        end = m.end()
        if (
            end < len(text)
            and text[end] in " -/"
            and end + 1 < len(text)
            and text[end + 1].isalnum()
        ):
            nxt = _ID_CHUNK.match(text, end + 1)
            if nxt and (
                any(c.isdigit() for c in nxt.group())
                or (len(nxt.group()) <= 2 and nxt.group().isupper())
            ):
                end += 1
                continue
        break
    while end > pos and not text[end - 1].isalnum():
        end -= 1
    if digits >= 4 and end - pos >= 6:
        return pos, end
    return None


# -- NAME -------------------------------------------------------------------

_NAME_LOCALES = (
    "en_US", "en_GB", "en_IE", "en_IN", "en_NZ", "en_NG", "en_KE", "en_PK", "de_DE", "de_AT",
    "de_CH", "fr_FR", "fr_CA", "es_ES", "es_MX", "es_AR", "it_IT", "nl_NL", "pt_BR", "pt_PT",
    "pl_PL", "sv_SE", "da_DK", "no_NO", "fi_FI", "cs_CZ", "sk_SK", "ro_RO", "hu_HU", "hr_HR",
    "sl_SI", "tr_TR", "id_ID", "vi_VN", "yo_NG", "ig_NG", "ha_NG", "zu_ZA", "tw_GH", "sw",
    "et_EE", "lt_LT", "lv_LV", "ja_JP", "zh_CN", "zh_TW",
)  # fmt: skip


def _words(block: str) -> list[str]:
    return block.split()


# Words that are names in some list but far more often ordinary words in
# support chat (found by intersecting the name lists with common English
# words); they count as names only after a cue or before a known surname.
_AMBIGUOUS = frozenset(
    _words(
        """
        About Across After Again Also Amber Among An Angel Apple April Art August Autumn Baker
        Bill Bo Both Brand Brook Brooks Can Case Chance Chase Cherry Christian Crystal Daisy
        Dale Dawn Day Dean Destiny Diamond Don Dove Drew Earl Else Eve Faith Fancy Forest Frank
        Friday Gene Gift Glen Golden Grace Grant Guy Happy Harmony Heaven Holly Honey Hope
        Hunter Iris Ivy Jack Jade Jet Job Jordan Joy June King Lane Liberty Lily Line Love Lucky
        Major Man March Mark Max May Miles Monday Morning Much Nice Noble Ocean Page Paris
        Patience Pearl Peer Penny Per Pink Price Queen Rain Ray Reed Rich River Robin Rock Rose
        Ruby Sage Said Saturday Scarlett Sky Snow Sol Song Spring Star Sterling Stone Storm
        Summer Sunday Sunny Sydney Thursday Tuesday Unity Van Victoria Violet Wednesday Will
        Winter Young Austin Florence Georgia Charlotte Phoenix Savannah Dallas Houston Madison
        Aurora Sierra Regina Lincoln Jackson Victory Justice Precious Trinity Harbour Hill
        Mercedes Porsche Lexus Tesla Apollo Atlas Nova Luna Ella Lot Toy Till Lean Harm Lone Mad
        Odd Floor Server Edit Dev Meta Chi Li Lo Vi Om Tan Eta Ties Simi Sine Tilde Gregorian
        Manus Pascal Kelvin Newton Kaiser Mar Luz Paz Sole Amor Alba Ana Bay Bear Blue Bonnie
        Cash Clay Coral Cotton Crimson Delta Echo Ember Fern Fox Gray Grey Green Haven Journey
        Kind Lake Leaf Legend Lyric Magic Maple Marina Marsh Melody Mercy Mint Moon Myrtle North
        Oak Olive Pepper Pilot Poppy Rebel Royal Rusty Saint Salem Shadow Silver Sparrow Sugar
        Tiger Topaz True Valentine Wren Zen Long Ping Bin Hong Kong Sun Wing Young Chance Dom
        """
    )
)
# Capitalised words that are never names here, whatever a list says.
_NEVER = frozenset(
    _words(
        """
        The This That These Those There Here Hi Hello Hey Dear Thanks Thank Please Sorry Yes No
        Ok Okay Sure Best Kind Regards Cheers Support Team Business Free Pro Plan Plans Billing
        Settings Data Export Account Invoice Invoices Refund Trial Password Login Email Phone
        Help Admin Manager Customer Users User Sales Finance Lumen Tasks Slack Zapier Google
        Calendar Github GitHub Gantt Kanban Board Chart Bank Pay Card Visa Street Road Avenue
        Lane Drive Court Place Square Office Desk Station Airport Hotel Mr Mrs Ms Dr Prof Sir
        Madam Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March
        April May June July August September October November December I I'm Im Is Are Was Were
        Be Been Do Does Did Can Could Would Should Will Shall Must Might Have Has Had Get Got Go
        Going Make Let My Our Your Their His Her Its We You They He She It What When Where Why
        How Which Who Whom Whose If Then Else Because And Or But So Not All Any Some Every Each
        New Old Good Great Quick Just Still Also Only Even Again Today Tomorrow Yesterday
        Morning Evening Night Week Month Year Click Go Open Save Delete Edit Add Remove Start
        Stop Upgrade
        """
    )
)
# Short forms people sign with that the lists (full given names) lack.
_NICKNAMES = frozenset(
    _words(
        """
        Abby Alex Andy Becky Beth Ben Bill Billy Bob Bobby Chris Dan Danny Dave Eddie Gabe Greg
        Jake Jeff Jen Jenny Jim Jimmy Joe Joey Jon Josh Kate Katie Liz Maggie Matt Meg Mike Nate
        Nick Pam Pete Rick Rob Sam Steve Ted Tim Tom Tommy Tony Will Zach
        """
    )
)
_TITLE = r"(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Sir|Madam|Herr|Frau|Mme|Mlle|Sr|Sra|Srta|Signor|Signora)"
_PARTICLE = (
    r"(?:van der|van den|van de|von der|van|von|de la|de los|del|de|da|di|du|dos|das|le|la|"
    r"bin|binti|al|el|ibn)"
)
# "Anna", "O'Brien", "McDonald", "Jean-Luc"
_WORD = r"(?:[A-Z]['’])?[A-ZÀ-ÖØ-Þ][a-zà-öø-ÿ]+(?:[A-Z][a-z]+)?(?:['’-][A-Za-zÀ-ÖØ-öø-ÿ]+)*"
_NAMESEQ = rf"(?:{_PARTICLE}\s+)?{_WORD}(?:\s+(?:{_PARTICLE}\s+)?{_WORD}){{0,2}}"
_PARTICLE_SURNAME = re.compile(rf"\s+{_PARTICLE}\s+{_WORD}")
_TITLED = re.compile(rf"\b{_TITLE}\.?\s+({_NAMESEQ})")
# Cues after which capitalised words are a name even if no list knows them.
_STRONG_CUE = re.compile(
    rf"(?:\bmy name is|\bmy name's|\bname\s*:|\bnamed|\bcall me|\bsigned,?|\battn:?|\bon behalf of|"
    rf"\baccount owner:?|\bin the name of)\s+({_NAMESEQ})",
    re.IGNORECASE,
)
_LOWER_NAME = re.compile(r"\bmy name is\s+([a-zà-öø-ÿ]+(?:\s+[a-zà-öø-ÿ]+)?)\b")
# Cues after which one capitalised word is a name if it is a known first name, ambiguous or not.
_WEAK_CUE = re.compile(
    rf"(?:\bI'm|\bI’m|\bI am|\bthis is|\bit's|\bhi|\bhello|\bhey|\bdear|\bthanks,?|"
    rf"\bthank you,?|\bcheers,?|\bask for|\bspeak (?:to|with)|\bspoke (?:to|with)|\btalk to|"
    rf"\bcontact|\bcolleague|\bmy (?:husband|wife|"
    rf"boss|manager|colleague|partner|son|daughter))\s+({_NAMESEQ})",
)
_SIGNOFF = re.compile(
    rf"(?:^|\n)\s*(?:(?:best|kind|warm|many)?\s*regards|thanks|thank you|cheers|best|sincerely|"
    rf"yours(?: truly| sincerely)?|--|—|mit freundlichen grüßen|viele grüße|cordialement)"
    rf"\s*[,!.]?\s*\n\s*({_NAMESEQ})\s*(?:$|\n)",
    re.IGNORECASE,
)
# "… thx - Kenji" / "Cheers, Tom" closing a message on one line.
_SIGNOFF_INLINE = re.compile(
    rf"\b(?:thanks|thx|ty|cheers|regards|best|br)\s*[-—,!.:]+\s*({_NAMESEQ})\s*[!.]?\s*$",
    re.IGNORECASE,
)
_WORDS = re.compile(_WORD)
_NAME_SHAPE = re.compile(rf"^{_WORD}$")
_SKIP_BEFORE = re.compile(r"\b(?:in|at|near|to the|from the|visit|visiting|of)\s+$")
# "São Paulo", "San Diego", "Fort Worth": the word after is a place.
_PLACE_PREFIX = frozenset(
    _words(
        """
        São San Santa Santo Saint St Sankt Fort Port Mount Mt New Los Las El Lake Cape Puerto
        Porto
        """
    )
)


@functools.lru_cache(maxsize=1)
def _name_lists() -> tuple[frozenset[str], frozenset[str]]:
    """First and last names from faker's person providers (packaged data, no download)."""
    first: set[str] = set()
    last: set[str] = set()
    for locale in _NAME_LOCALES:
        try:
            provider = importlib.import_module(f"faker.providers.person.{locale}").Provider
        except (ImportError, AttributeError):  # a faker release without this locale
            log.debug("faker has no person provider for %s", locale)
            continue
        for attr in vars(provider):
            target = (
                first if attr.startswith("first_") else last if attr.startswith("last_") else None
            )
            value = getattr(provider, attr)
            if target is not None and isinstance(value, (list, tuple, dict)):
                target.update(n for n in value if isinstance(n, str) and _NAME_SHAPE.match(n))
    return frozenset(first | _NICKNAMES), frozenset(last)


def _surname_like(word: str, last: frozenset[str]) -> bool:
    return word not in _NEVER and (word in last or word not in _AMBIGUOUS)


def _names(text: str) -> Iterator[Entity]:
    first, last = _name_lists()

    def entity(start: int, words: list[re.Match[str]], n: int) -> Entity:
        end = start + words[n - 1].end()
        return Entity("NAME", start, end, text[start:end])

    def after_strong_cue(m: re.Match[str]) -> Entity | None:
        # Whatever capitalised words follow "my name is", a title or a sign-off.
        words = list(_WORDS.finditer(m.group(1)))
        n = 0
        for w in words:
            if w.group() in _NEVER and not (n == 0 and w.group() in first):
                break
            n += 1
        return entity(m.start(1), words, n) if n else None

    def after_weak_cue(m: re.Match[str]) -> Entity | None:
        # "I'm X", "Hi X", "ask for X": X must be a known name, or a two-word
        # run of capitalised words that are not ordinary words.
        words = list(_WORDS.finditer(m.group(1)))
        head = words[0].group()
        if head in _NEVER and head not in _AMBIGUOUS:  # "I'm Happy", "Hi Support"
            return None
        if head in first or head in last:
            n = 1
            while n < len(words) and _surname_like(words[n].group(), last):
                n += 1
            return entity(m.start(1), words, n)
        plain = [w for w in words if w.group() not in _NEVER and w.group() not in _AMBIGUOUS]
        if len(words) >= 2 and plain[:2] == words[:2]:
            n = 2
            while n < len(words) and words[n] in plain:
                n += 1
            return entity(m.start(1), words, n)
        return None

    for pattern in (_TITLED, _STRONG_CUE, _SIGNOFF, _SIGNOFF_INLINE):
        for m in pattern.finditer(text):
            if (ent := after_strong_cue(m)) is not None:
                yield ent
    for m in _LOWER_NAME.finditer(text):
        lowered = m.group(1).split()
        known = 0
        while known < len(lowered) and (
            lowered[known].capitalize() in first or lowered[known].capitalize() in last
        ):
            known += 1
        if known:
            s = m.start(1)
            e = s + len(" ".join(lowered[:known]))
            yield Entity("NAME", s, e, text[s:e])
    for m in _WEAK_CUE.finditer(text):
        if (ent := after_weak_cue(m)) is not None:
            yield ent
    # Without a cue: a known first name that is not an ordinary word, with the
    # surname-like words after it; or any capitalised word before a known surname.
    tokens = list(_WORDS.finditer(text))
    i = 0
    while i < len(tokens):
        run = [tokens[i]]
        while (
            i + len(run) < len(tokens)
            and len(run) < 3
            and text[run[-1].end() : tokens[i + len(run)].start()] == " "
        ):
            run.append(tokens[i + len(run)])
        word = run[0].group()
        prev = text[max(0, run[0].start() - 8) : run[0].start()].split()
        place = word in _PLACE_PREFIX and len(run) > 1
        if (
            place
            or (prev and prev[-1].rstrip(".") in _PLACE_PREFIX)
            or word in _NEVER
            or len(word) < 3
        ):
            i += 1
            continue
        if word in first and word not in _AMBIGUOUS:
            n = 1
            while n < len(run) and _surname_like(run[n].group(), last):
                n += 1
            near = text[max(0, run[0].start() - 16) : run[0].start()].lower()
            if n == 1 and _SKIP_BEFORE.search(near):  # "in Austin", "near Florence"
                i += 1
                continue
        elif len(run) > 1 and run[1].group() in last and run[1].group() not in _AMBIGUOUS | _NEVER:
            n = 2
        else:
            i += 1
            continue
        end = run[n - 1].end()
        if n == 1 and (particle := _PARTICLE_SURNAME.match(text, end)):  # "Pieter de Vries"
            end = particle.end()
        yield Entity("NAME", run[0].start(), end, text[run[0].start() : end])
        i += n
    for kind, s, e in privacy_context.names_in_context(text, first, last):
        yield Entity(kind, s, e, text[s:e])


def _context(
    detector: Callable[[str], Iterable[tuple[str, int, int]]],
) -> Callable[[str, tuple[str, ...]], Iterator[Entity]]:
    def detect(text: str, _regions: tuple[str, ...]) -> Iterator[Entity]:
        for kind, s, e in detector(text):
            yield Entity(kind, s, e, text[s:e])

    return detect


# -- the scrubber -----------------------------------------------------------

_DETECTORS: dict[str, Callable[[str, tuple[str, ...]], Iterable[Entity]]] = {
    "SECRET": _context(privacy_context.secrets_in),
    "DOB": _context(privacy_context.dates_of_birth),
    "PROFILE": _context(privacy_context.profile_slugs),
    "EMAIL": lambda t, r: _emails(t),
    "IBAN": lambda t, r: _ibans(t),
    "CARD": lambda t, r: _cards(t),
    "GOV_ID": lambda t, r: _gov_ids(t),
    "IP": lambda t, r: _ips(t),
    "PHONE": lambda t, r: _phones(t, r),
    "ADDRESS": lambda t, r: _addresses(t),
    "NAME": lambda t, r: _names(t),
}


class Scrubber:
    """Detect and replace personal data.

    ``types`` limits detection to some of :data:`ENTITY_TYPES`; ``allow``
    lists strings that are public and kept (e.g. the company's own support
    address quoted in the knowledge base), compared case-insensitively.

    >>> Scrubber(allow=["support@lumen.example"]).scrub("support@lumen.example or me@home.example")
    'support@lumen.example or <EMAIL>'
    """

    def __init__(
        self,
        *,
        types: Iterable[str] | None = None,
        allow: Iterable[str] = (),
        phone_regions: Iterable[str] = PHONE_REGIONS,
    ) -> None:
        self.types = tuple(ENTITY_TYPES if types is None else types)
        unknown = sorted(set(self.types) - set(ENTITY_TYPES))
        if unknown:
            raise ValueError(f"types must be among {list(ENTITY_TYPES)}, got unknown {unknown}")
        self.allow = frozenset(a.strip().lower() for a in allow if a.strip())
        self.phone_regions = tuple(phone_regions)

    def find(self, text: str) -> list[Entity]:
        """Non-overlapping entities in text order."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        candidates = [
            ent
            for kind in self.types
            for ent in _DETECTORS[kind](text, self.phone_regions)
            if ent.end > ent.start and ent.text.strip().lower() not in self.allow
        ]
        candidates.sort(key=lambda e: (-(e.end - e.start), _RANK[e.type], e.start))
        taken: list[Entity] = []
        for ent in candidates:
            if all(ent.end <= t.start or ent.start >= t.end for t in taken):
                taken.append(ent)
        return sorted(taken, key=lambda e: e.start)

    def scrub(self, text: str) -> str:
        """``text`` with every entity replaced by ``<TYPE>``."""
        out, pos = [], 0
        for ent in self.find(text):
            out.append(text[pos : ent.start])
            out.append(f"<{ent.type}>")
            pos = ent.end
        out.append(text[pos:])
        return "".join(out)


_DEFAULT = Scrubber()


def find_entities(text: str) -> list[Entity]:
    """Personal data in ``text`` (all types), non-overlapping, in text order.

    >>> text = "IBAN DE89 3704 0044 0532 0130 00, card 4111 1111 1111 1111"
    >>> [(e.type, e.text) for e in find_entities(text)]
    [('IBAN', 'DE89 3704 0044 0532 0130 00'), ('CARD', '4111 1111 1111 1111')]
    """
    return _DEFAULT.find(text)


def scrub(text: str) -> str:
    """``text`` with all personal data replaced by typed placeholders (``<EMAIL>`` …)."""
    return _DEFAULT.scrub(text)


def public_allowlist(*documents: str) -> frozenset[str]:
    """Entities in public documents (e.g. the knowledge base), for ``Scrubber(allow=…)``.

    The company's own support address in an assistant's answer is a fact, not
    personal data; scrubbing it would teach the model to answer "<EMAIL>".

    >>> sorted(public_allowlist("Support: email support@lumen.example"))
    ['support@lumen.example']
    """
    return frozenset(e.text for doc in documents for e in _DEFAULT.find(doc))
