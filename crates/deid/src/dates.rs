//! Date shifting for the Retain Longitudinal Temporal Information with Modified Dates option.
//!
//! Every date of a patient moves by the same whole number of days, so intervals, the order of
//! events and times of day are unchanged; DT values keep their time and UTC offset.

use time::{Date, Duration, Month};

/// Shifts a DA value (`YYYYMMDD`, or the old `YYYY.MM.DD`). Returns `None` for a value that is
/// not a full valid date: such a value cannot be shifted and must not be kept.
pub fn shift_da(value: &str, days: i64) -> Option<String> {
    let v = value.trim_matches(|c: char| c == ' ' || c == '\0');
    let digits: String = if v.len() == 10 && v.as_bytes()[4] == b'.' && v.as_bytes()[7] == b'.' {
        v.replace('.', "")
    } else {
        v.to_string()
    };
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let date = parse_ymd(&digits)?;
    let shifted = date.checked_add(Duration::days(days))?;
    Some(format_ymd(shifted))
}

/// Shifts the date part of a DT value (`YYYYMMDD[HHMMSS[.FFFFFF]][&ZZXX]`). A DT with only
/// a year or a month cannot be shifted by days and gives `None`.
pub fn shift_dt(value: &str, days: i64) -> Option<String> {
    let v = value.trim_matches(|c: char| c == ' ' || c == '\0');
    if v.len() < 8 || !v.as_bytes()[..8].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let shifted = format_ymd(parse_ymd(&v[..8])?.checked_add(Duration::days(days))?);
    Some(format!("{shifted}{}", &v[8..]))
}

fn parse_ymd(d: &str) -> Option<Date> {
    let y: i32 = d[0..4].parse().ok()?;
    let m: u8 = d[4..6].parse().ok()?;
    let day: u8 = d[6..8].parse().ok()?;
    Date::from_calendar_date(y, Month::try_from(m).ok()?, day).ok()
}

fn format_ymd(d: Date) -> String {
    format!("{:04}{:02}{:02}", d.year(), u8::from(d.month()), d.day())
}

/// Whether `s` contains something shaped like a calendar date (`YYYYMMDD` or `YYYY-MM-DD`,
/// `YYYY.MM.DD`, `YYYY/MM/DD` with a plausible year, month and day), used to scrub dates out
/// of free text under the Clean Descriptors option.
pub fn date_like_spans(s: &str) -> Vec<(usize, usize)> {
    let b = s.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0;
    while i + 8 <= b.len() {
        let boundary_before = i == 0 || !b[i - 1].is_ascii_digit();
        if boundary_before {
            for (len, sep) in [
                (8usize, None),
                (10, Some(b'-')),
                (10, Some(b'.')),
                (10, Some(b'/')),
            ] {
                if i + len > b.len() {
                    continue;
                }
                let w = &b[i..i + len];
                let digits: Vec<u8> = match sep {
                    None => w.to_vec(),
                    Some(c) => {
                        if w[4] != c || w[7] != c {
                            continue;
                        }
                        [&w[0..4], &w[5..7], &w[8..10]].concat()
                    }
                };
                let boundary_after = i + len == b.len() || !b[i + len].is_ascii_digit();
                if boundary_after && digits.iter().all(u8::is_ascii_digit) {
                    let text = std::str::from_utf8(&digits).unwrap_or("");
                    let plausible = parse_ymd(text)
                        .map(|d| (1880..=2100).contains(&d.year()))
                        .unwrap_or(false);
                    if plausible {
                        spans.push((i, i + len));
                        i += len - 1;
                        break;
                    }
                }
            }
        }
        i += 1;
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shifts_keep_intervals() {
        assert_eq!(shift_da("20200301", -1).unwrap(), "20200229");
        assert_eq!(shift_da("2020.03.01", -1).unwrap(), "20200229");
        assert_eq!(shift_da("20210101", -366).unwrap(), "20200101");
        assert!(shift_da("2020", -1).is_none());
        assert!(shift_da("20201341", -1).is_none());
        assert!(shift_da("", -1).is_none());
        assert_eq!(
            shift_dt("20200301101530.123456+0100", -1).unwrap(),
            "20200229101530.123456+0100"
        );
        assert!(shift_dt("2020", -1).is_none());
    }

    #[test]
    fn finds_dates_in_text() {
        let s = "seen 20190412 and 2019-04-13, not 1234567890 or 20191340";
        let found: Vec<&str> = date_like_spans(s).iter().map(|&(a, b)| &s[a..b]).collect();
        assert_eq!(found, vec!["20190412", "2019-04-13"]);
    }
}
