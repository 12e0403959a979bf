//! Check hooks: a malformed value is refused before it takes effect, with what is wrong
//! and what is allowed; the list settings' parsers.

use super::*;

/// GUC check hooks: a malformed list is rejected before it takes effect, so a bad
/// `pg_ctl reload` keeps the old value (PostgreSQL logs our detail) and `ALTER SYSTEM`
/// fails with it. The detail says what is wrong, the hint what is allowed.
#[pgrx::pg_guard]
pub(super) unsafe extern "C-unwind" fn check_devices(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: PostgreSQL passes a valid pointer to the candidate value.
    unsafe { check_list(newval, &devices_allowed(), |t| parse_device_list(t).map(|_| ())) }
}

#[pgrx::pg_guard]
pub(super) unsafe extern "C-unwind" fn check_ports(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: as above.
    unsafe { check_list(newval, &ports_allowed(), |t| parse_port_list(t).map(|_| ())) }
}

fn devices_allowed() -> String {
    format!(
        "Allowed values: up to {MAX_DEVICES} network device names ({MAX_DEVICE_NAME} characters at most, no blanks, '/' or ':'), \
         each once, separated by commas, e.g. 'eth0,lo'; empty for the first device that is up and not loopback."
    )
}

fn ports_allowed() -> String {
    format!(
        "Allowed values: up to {} TCP port numbers from 1 to 65535, each once, separated by commas, e.g. '6432,6433'; \
         empty for the server's own port alone.",
        MAX_PORTS - 1
    )
}

unsafe fn check_list(newval: *mut *mut c_char, allowed: &str, parse: impl Fn(&str) -> Result<(), String>) -> bool {
    // SAFETY: the caller passes PostgreSQL's pointer to the candidate value (NULL allowed).
    let value = unsafe {
        if newval.is_null() || (*newval).is_null() {
            return true;
        }
        CStr::from_ptr(*newval)
    };
    let detail = match value.to_str() {
        Err(_) => "The value is not valid UTF-8.".to_string(),
        Ok(text) => match parse(text) {
            Ok(()) => return true,
            Err(detail) => detail,
        },
    };
    set_check_detail(&detail);
    set_check_hint(allowed);
    false
}

#[pgrx::pg_guard]
pub(super) unsafe extern "C-unwind" fn check_capture_method(
    newval: *mut std::ffi::c_int,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: PostgreSQL passes a valid pointer to the candidate value.
    let value = unsafe { *newval };
    if value == CaptureMethod::Pcap as i32 && !CaptureMethod::PCAP_BUILT_IN {
        set_check_detail("This build of pg_netstat has no libpcap backend.");
        set_check_hint(
            "Build it with the pcap feature (needs libpcap-dev): cargo pgrx install --release --features pcap",
        );
        return false;
    }
    if value == CaptureMethod::Ring as i32 && !CaptureMethod::RING_BUILT_IN {
        set_check_detail("This build of pg_netstat has no AF_PACKET ring (it is the portable build).");
        set_check_hint("Use auto or pcap, or on Linux install a build without the portable feature.");
        return false;
    }
    true
}

fn set_check_hint(hint: &str) {
    let c = CString::new(hint.replace('\0', " ")).unwrap_or_default();
    // SAFETY: as for the detail below.
    unsafe {
        pg_sys::GUC_check_errhint_string = pg_sys::pstrdup(c.as_ptr());
    }
}

fn set_check_detail(detail: &str) {
    let c = CString::new(detail.replace('\0', " ")).unwrap_or_default();
    // SAFETY: GUC_check_errdetail_string expects a palloc'd string in the current
    // context; pstrdup makes one from our NUL-terminated copy.
    unsafe {
        pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(c.as_ptr());
    }
}

/// A comma-separated list setting: entries trimmed, none empty, none twice, at most
/// `max`. An empty (or all-blank) value is an empty list. Messages are fit for a GUC
/// error detail; `example` shows a well-formed list.
fn parse_list<T: PartialEq>(
    value: &str,
    example: &str,
    max: usize,
    parse: impl Fn(&str) -> Result<T, String>,
    twice: impl Fn(&str) -> String,
    too_many: impl Fn(usize) -> String,
) -> Result<Vec<T>, String> {
    if value.trim().is_empty() {
        return Ok(Vec::new());
    }
    // Counted before anything is parsed: the check for an entry listed twice compares
    // each with those before it, which for a list of any length (the postmaster checks
    // it, and every backend again at each reload) would be quadratic (issue 29).
    let entries = value.split(',').count();
    if entries > max {
        return Err(too_many(entries));
    }
    let mut out: Vec<T> = Vec::with_capacity(entries);
    for (i, raw) in value.split(',').enumerate() {
        let text = raw.trim();
        if text.is_empty() {
            return Err(format!("Entry {} of the list is empty; write {example}.", i + 1));
        }
        let item = parse(text)?;
        if out.contains(&item) {
            return Err(twice(text));
        }
        out.push(item);
    }
    Ok(out)
}

/// Parses the `pg_netstat.devices` setting: interface names; empty means "choose for me".
pub fn parse_device_list(value: &str) -> Result<Vec<String>, String> {
    parse_list(
        value,
        "names separated by single commas, e.g. 'eth0,lo'",
        MAX_DEVICES,
        |name| {
            match valid_device_name(name) {
            true => Ok(name.to_string()),
            false => Err(format!(
                "\"{name}\" is not a valid network device name: 1 to {MAX_DEVICE_NAME} characters, no blanks, '/', ':' or ','."
            )),
        }
        },
        |name| format!("Device \"{name}\" is listed twice."),
        |n| format!("{n} devices are listed; at most {MAX_DEVICES} can be captured."),
    )
}

/// Parses `pg_netstat.ports`: extra TCP ports counted together with the server's own
/// port, e.g. a connection pooler's. Empty means none.
pub fn parse_port_list(value: &str) -> Result<Vec<u16>, String> {
    parse_list(
        value,
        "ports separated by single commas, e.g. '6432,6433'",
        MAX_PORTS - 1,
        |text| match text.parse::<u32>() {
            Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
            _ => Err(format!("\"{text}\" is not a TCP port number (1 to 65535).")),
        },
        |port| format!("Port {port} is listed twice."),
        |n| format!("{n} ports are listed; at most {} can be added to the server's own port.", MAX_PORTS - 1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_lists() {
        assert_eq!(parse_device_list(""), Ok(vec![]));
        assert_eq!(parse_device_list("  "), Ok(vec![]));
        assert_eq!(parse_device_list("eth0"), Ok(vec!["eth0".to_string()]));
        assert_eq!(parse_device_list(" eth0 , lo "), Ok(vec!["eth0".to_string(), "lo".to_string()]));
        assert!(parse_device_list("eth0,,lo").unwrap_err().contains("Entry 2"));
        assert!(parse_device_list("eth0,").unwrap_err().contains("empty"));
        assert!(parse_device_list("eth0,eth0").unwrap_err().contains("twice"));
        assert!(parse_device_list("a b").unwrap_err().contains("not a valid"));
        assert!(parse_device_list("averyveryverylongname").unwrap_err().contains("1 to 15"));
        let many: Vec<String> = (0..=MAX_DEVICES).map(|i| format!("d{i}")).collect();
        assert!(parse_device_list(&many.join(",")).unwrap_err().contains("at most 16"));
        assert_eq!(parse_device_list(&many[..MAX_DEVICES].join(",")).unwrap().len(), MAX_DEVICES);
        // A list of any length is refused by its count, at once (it used to be checked
        // for entries listed twice first, comparing each with all before it).
        let huge: Vec<String> = (0..200_000).map(|i| format!("d{i}")).collect();
        let started = std::time::Instant::now();
        assert!(parse_device_list(&huge.join(",")).unwrap_err().contains("200000 devices are listed"));
        let ports: Vec<String> = (0..200_000).map(|i| (1 + i % 65535).to_string()).collect();
        assert!(parse_port_list(&ports.join(",")).unwrap_err().contains("200000 ports are listed"));
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "{:?}", started.elapsed());
    }

    #[test]
    fn port_lists() {
        assert_eq!(parse_port_list(""), Ok(vec![]));
        assert_eq!(parse_port_list(" 6432 , 7000"), Ok(vec![6432, 7000]));
        assert!(parse_port_list("6432,,7000").unwrap_err().contains("Entry 2"));
        assert!(parse_port_list("0").unwrap_err().contains("not a TCP port"));
        assert!(parse_port_list("65536").unwrap_err().contains("not a TCP port"));
        assert!(parse_port_list("pgbouncer").unwrap_err().contains("not a TCP port"));
        assert!(parse_port_list("6432,6432").unwrap_err().contains("twice"));
        let many: Vec<String> = (1..=16).map(|i| (6000 + i).to_string()).collect();
        assert!(parse_port_list(&many.join(",")).unwrap_err().contains("at most 15"));
        assert_eq!(parse_port_list(&many[..15].join(",")).unwrap().len(), 15);
    }
}
