//! A one-pass reader for the few top-level string fields the load generator wants from a JSON
//! object, for the receive path, which serde_json's derive made the largest user-space cost per
//! delivery (a typical frame has eight string fields, and serde decodes each).
//!
//! It is only a fast path: whenever the input is anything but plainly valid — an escape in a key
//! or in a wanted value, a wanted field that is not a string, a wanted key twice, malformed or
//! deeply nested JSON — it gives up and the caller asks serde_json, whose answer (value or error)
//! stays the reference. Values it skips are still checked against the JSON grammar, so it never
//! accepts a frame serde_json would reject.

/// Nesting deeper than this is left to serde_json (which stops at 128).
const MAX_DEPTH: usize = 64;

/// Read the top-level object `text`, handing each wanted key's string value (or `None` for
/// `null`) to `found(index into wanted, value)`. `None` when the fast path does not apply.
pub fn scan_fields<'a>(
    text: &'a str,
    wanted: &[&str],
    mut found: impl FnMut(usize, Option<&'a str>),
) -> Option<()> {
    let mut p = Parser {
        s: text.as_bytes(),
        text,
        i: 0,
    };
    let mut seen = 0u32;
    p.ws();
    p.eat(b'{')?;
    p.ws();
    if !p.eat_if(b'}') {
        loop {
            let key = p.plain_string()?;
            p.ws();
            p.eat(b':')?;
            p.ws();
            match wanted.iter().position(|w| *w == key) {
                Some(k) => {
                    if seen & (1 << k) != 0 {
                        return None; // serde_json reports duplicate fields
                    }
                    seen |= 1 << k;
                    if p.s.get(p.i) == Some(&b'n') {
                        p.literal(b"null")?;
                        found(k, None);
                    } else {
                        found(k, Some(p.plain_string()?));
                    }
                }
                None => p.skip_value(0)?,
            }
            p.ws();
            if p.eat_if(b',') {
                p.ws();
                continue;
            }
            p.eat(b'}')?;
            break;
        }
    }
    p.ws();
    (p.i == p.s.len()).then_some(())
}

struct Parser<'a> {
    s: &'a [u8],
    text: &'a str,
    i: usize,
}

impl<'a> Parser<'a> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.s.get(self.i) {
            self.i += 1;
        }
    }

    fn eat(&mut self, b: u8) -> Option<()> {
        self.eat_if(b).then_some(())
    }

    fn eat_if(&mut self, b: u8) -> bool {
        let hit = self.s.get(self.i) == Some(&b);
        self.i += usize::from(hit);
        hit
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i + word.len();
        (self.s.get(self.i..end)? == word).then(|| self.i = end)
    }

    /// Move to the next `"`, `\\` or control character (the end of the input if none).
    fn skip_to_special(&mut self) {
        self.i += find_special(&self.s[self.i.min(self.s.len())..]);
    }

    /// A string without escapes, borrowed from the input.
    fn plain_string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.i;
        self.skip_to_special();
        if *self.s.get(self.i)? != b'"' {
            return None;
        }
        let end = self.i;
        self.i += 1;
        // Both ends sit next to an ASCII quote, so they are character boundaries.
        self.text.get(start..end)
    }

    /// Any string, escapes checked but not decoded.
    fn skip_string(&mut self) -> Option<()> {
        self.eat(b'"')?;
        loop {
            self.skip_to_special();
            match *self.s.get(self.i)? {
                b'"' => {
                    self.i += 1;
                    return Some(());
                }
                b'\\' => {
                    self.i += 1;
                    match *self.s.get(self.i)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 1,
                        b'u' => {
                            let hex = self.s.get(self.i + 1..self.i + 5)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return None;
                            }
                            // Lone surrogates are left to serde_json's judgement.
                            if matches!(hex[0], b'd' | b'D') {
                                return None;
                            }
                            self.i += 5;
                        }
                        _ => return None,
                    }
                }
                _ => return None, // a control character
            }
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while self.s.get(self.i).is_some_and(u8::is_ascii_digit) {
            self.i += 1;
        }
        self.i - start
    }

    fn skip_number(&mut self) -> Option<()> {
        self.eat_if(b'-');
        match *self.s.get(self.i)? {
            b'0' => self.i += 1,
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        if self.eat_if(b'.') && self.digits() == 0 {
            return None;
        }
        if let Some(b'e' | b'E') = self.s.get(self.i) {
            self.i += 1;
            if let Some(b'+' | b'-') = self.s.get(self.i) {
                self.i += 1;
            }
            if self.digits() == 0 {
                return None;
            }
        }
        Some(())
    }

    fn skip_value(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match *self.s.get(self.i)? {
            b'"' => self.skip_string(),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.skip_number(),
            b'[' => self.skip_items(b']', |this| this.skip_value(depth + 1)),
            b'{' => self.skip_items(b'}', |this| {
                this.skip_string()?;
                this.ws();
                this.eat(b':')?;
                this.ws();
                this.skip_value(depth + 1)
            }),
            _ => None,
        }
    }

    /// Skips an array or object from its opening byte: comma-separated `item`s until `close`.
    fn skip_items(
        &mut self,
        close: u8,
        mut item: impl FnMut(&mut Self) -> Option<()>,
    ) -> Option<()> {
        self.i += 1;
        self.ws();
        if self.eat_if(close) {
            return Some(());
        }
        loop {
            item(self)?;
            self.ws();
            if self.eat_if(close) {
                return Some(());
            }
            self.eat(b',')?;
            self.ws();
        }
    }
}

/// Index of the first `"`, `\\` or byte below 0x20 in `s` (`s.len()` if none), eight bytes at a
/// time: strings are most of a frame.
fn find_special(s: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // High bit set in each byte of `v` below `n` (exact up to the first such byte).
    let below = |v: u64, n: u8| v.wrapping_sub(ONES * n as u64) & !v & HIGH;
    let mut i = 0;
    while let Some(chunk) = s.get(i..i + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let v = u64::from_le_bytes(word);
        let hits = below(v ^ (ONES * b'"' as u64), 1)
            | below(v ^ (ONES * b'\\' as u64), 1)
            | below(v, 0x20);
        if hits != 0 {
            return i + (hits.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    i + s[i..]
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .unwrap_or(s.len() - i)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WANTED: &[&str] = &["type", "message"];

    fn scan(text: &str) -> Option<[Option<&str>; 2]> {
        let mut out = [None; 2];
        scan_fields(text, WANTED, |k, v| out[k] = v)?;
        Some(out)
    }

    #[test]
    fn reads_wanted_fields_and_skips_the_rest() {
        let f = r#"{"type":"message","room":"r","id":"x","n":-1.5e3,"ok":true,"z":null,
            "a":[1,{"b":[]},"s\"\u00e9"],"message":"lg1 0 1 2 3 ..","ts":1} "#;
        assert_eq!(scan(f), Some([Some("message"), Some("lg1 0 1 2 3 ..")]));
        assert_eq!(scan(r#"{"type":null}"#), Some([None, None]));
        assert_eq!(scan(" {} "), Some([None, None]));
        assert_eq!(scan(r#"{"message":"é ü"}"#), Some([None, Some("é ü")]));
    }

    #[test]
    fn gives_up_where_serde_must_decide() {
        for t in [
            r#"{"type":"a\"b"}"#,         // escape in a wanted value
            r#"{"typ\u0065":"message"}"#, // escape in a key
            r#"{"type":5}"#,              // wanted field of another type
            r#"{"type":"a","type":"b"}"#, // duplicate wanted field
            r#"{"type":"a"} x"#,          // trailing characters
            r#"{"x":01}"#,                // leading zero
            r#"{"x":1.}"#,
            r#"{"x":"\q"}"#,
            r#"{"x":"\ud800"}"#,
            "{\"x\":\"a\tb\"}", // raw control character
            r#"{"x":[1,]}"#,
            r#"{"x":tru}"#,
            r#"["message","hi"]"#,
            "not json",
            "",
        ] {
            assert_eq!(scan(t), None, "{t}");
        }
    }

    #[test]
    fn special_bytes_are_found_at_every_offset() {
        for len in 0..20 {
            for at in 0..len {
                for special in [b'"', b'\\', 0x00, 0x1F] {
                    let mut s = vec![b'a'; len];
                    s[at] = special;
                    // Bytes just above the thresholds must not count.
                    if at + 1 < len {
                        s[at + 1] = 0x20;
                    }
                    assert_eq!(find_special(&s), at, "{len} {at} {special}");
                }
            }
            let plain: Vec<u8> = (0..len)
                .map(|i| [b'a', 0x20, 0x7F, 0xC3, b'#', b']'][i % 6])
                .collect();
            assert_eq!(find_special(&plain), len);
        }
    }

    #[test]
    fn deep_nesting_is_left_to_serde() {
        let deep = format!(r#"{{"x":{}{}}}"#, "[".repeat(100), "]".repeat(100));
        assert_eq!(scan(&deep), None);
        let shallow = format!(r#"{{"x":{}{}}}"#, "[".repeat(10), "]".repeat(10));
        assert_eq!(scan(&shallow), Some([None, None]));
    }
}
