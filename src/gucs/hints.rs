//! What is allowed, added to PostgreSQL's refusal of a value it could not read.

use super::*;

/// PostgreSQL reads a number before any check hook could see it, so a value it cannot
/// read at all ("ten", "5 parsecs", "3GB" past the integer range) or a Boolean it does
/// not know is refused with a message that names the value but not what is allowed.
/// The settings' part of the log hook (`log_hook`) adds that as a hint, for pg_netstat's
/// own settings only: to the error ALTER SYSTEM returns, and to the log lines of a reload
/// or of the server start. PostgreSQL documents that a log hook should change no more of
/// the report than whether it is logged; adding a hint that was missing (or appending to
/// PostgreSQL's units hint) is as small as that can be, and it is done before the report
/// is sent anywhere.
///
/// # Safety
/// `edata` is the report being emitted (its strings NUL-terminated or NULL), in the
/// memory context current here.
pub unsafe fn on_report(edata: &mut pg_sys::ErrorData) {
    // SAFETY: by the caller's promise. The new hint is palloc'd in the report's own
    // context, which is current here, so it lives as long as the report.
    unsafe {
        if !edata.message_id.is_null() && !edata.message.is_null() {
            let id = CStr::from_ptr(edata.message_id).to_bytes();
            let old = (!edata.hint.is_null()).then(|| CStr::from_ptr(edata.hint).to_string_lossy());
            if let Some(hint) = refusal_hint(id, &CStr::from_ptr(edata.message).to_string_lossy(), old.as_deref()) {
                if let Ok(c) = CString::new(hint) {
                    edata.hint = pg_sys::pstrdup(c.as_ptr());
                }
            }
        }
    }
}

/// The hint for a report PostgreSQL made about one of our settings, or `None` to leave
/// it alone. `message_id` is the untranslated format string (so this works whatever
/// lc_messages says); `message` the formatted text, which names the setting.
fn refusal_hint(message_id: &[u8], message: &str, old_hint: Option<&str>) -> Option<String> {
    let ours = match message_id {
        b"invalid value for parameter \"%s\": \"%s\"" => {
            let s = INT_SETTINGS.iter().find(|s| names(message, s.name))?;
            // PostgreSQL's only hint here lists the units; then ours need not repeat them.
            int_allowed(s, old_hint.is_none())
        }
        b"parameter \"%s\" requires a Boolean value" if BOOL_SETTINGS.iter().any(|n| names(message, n)) => {
            BOOL_ALLOWED.to_string()
        }
        _ => return None,
    };
    Some(match old_hint {
        Some(old) if !old.is_empty() => format!("{old} {ours}"),
        _ => ours,
    })
}

/// Whether `message` names `setting` (followed by a quote, whichever a translation uses,
/// not by more of a longer name).
fn names(message: &str, setting: &CStr) -> bool {
    let name = setting.to_str().unwrap_or_default();
    message
        .match_indices(name)
        .any(|(at, _)| !message[at + name.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_'))
}

fn int_allowed(s: &IntSetting, with_units: bool) -> String {
    match s.unit.words() {
        Some((symbol, units)) if with_units => format!(
            "Allowed values: whole numbers from {} to {} {symbol}; a unit may follow the number ({units}).",
            s.min, s.max
        ),
        Some((symbol, _)) => format!("Allowed values: whole numbers from {} to {} {symbol}.", s.min, s.max),
        None => format!("Allowed values: whole numbers from {} to {}.", s.min, s.max),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVALID: &[u8] = b"invalid value for parameter \"%s\": \"%s\"";

    #[test]
    fn an_unreadable_number_gets_its_bounds_and_units() {
        let hint = refusal_hint(INVALID, r#"invalid value for parameter "pg_netstat.interval": "ten""#, None);
        assert_eq!(
            hint.as_deref(),
            Some("Allowed values: whole numbers from 1 to 900000 s; a unit may follow the number (us, ms, s, min, h or d).")
        );
        let hint =
            refusal_hint(INVALID, r#"invalid value for parameter "pg_netstat.pcap_buffer_size": "3GB""#, None).unwrap();
        assert!(hint.contains("from 131070 to 1073741824 B") && hint.contains("kB, MB, GB or TB"), "{hint}");
        let hint = refusal_hint(INVALID, r#"invalid value for parameter "pg_netstat.max_flows": "lots""#, None);
        assert_eq!(hint.as_deref(), Some("Allowed values: whole numbers from 0 to 1048576."));
    }

    #[test]
    fn postgresqls_own_hint_is_kept_in_front() {
        let units = r#"Valid units for this parameter are "us", "ms", "s", "min", "h", and "d"."#;
        let hint =
            refusal_hint(INVALID, r#"invalid value for parameter "pg_netstat.pcap_timeout": "9 parsecs""#, Some(units));
        assert_eq!(hint, Some(format!("{units} Allowed values: whole numbers from 1 to 30000 ms.")));
    }

    #[test]
    fn a_boolean_gets_the_words_it_takes() {
        let id = b"parameter \"%s\" requires a Boolean value";
        let hint = refusal_hint(id, r#"parameter "pg_netstat.capture_loopback" requires a Boolean value"#, None);
        assert_eq!(hint.as_deref(), Some(BOOL_ALLOWED));
        let hint = refusal_hint(id, r#"parameter "pg_netstat.track_statements" requires a Boolean value"#, None);
        assert_eq!(hint.as_deref(), Some(BOOL_ALLOWED));
        assert_eq!(refusal_hint(id, r#"parameter "fsync" requires a Boolean value"#, None), None);
    }

    #[test]
    fn other_reports_are_left_alone() {
        // Other settings, settings whose check hooks give their own hint, other messages.
        assert_eq!(refusal_hint(INVALID, r#"invalid value for parameter "work_mem": "ten""#, None), None);
        assert_eq!(refusal_hint(INVALID, r#"invalid value for parameter "pg_netstat.devices": "lo,,x""#, None), None);
        assert_eq!(refusal_hint(INVALID, r#"invalid value for parameter "pg_netstat.interval_x": "1""#, None), None);
        assert_eq!(refusal_hint(b"%s", "pg_netstat.interval", None), None);
    }

    #[test]
    fn a_translated_message_is_recognised_by_the_name_alone() {
        let hint = refusal_hint(
            INVALID,
            "valeur invalide pour le paramètre « pg_netstat.packet_wait_time » : « bientôt »",
            None,
        );
        assert_eq!(
            hint.as_deref(),
            Some(
                "Allowed values: whole numbers from 1 to 60 s; a unit may follow the number (us, ms, s, min, h or d)."
            )
        );
    }

    #[test]
    fn every_numeric_setting_has_sane_bounds() {
        for s in &INT_SETTINGS {
            assert!(s.name.to_str().unwrap().starts_with("pg_netstat."));
            assert!(s.min <= s.max, "{:?}", s.name);
        }
    }
}
