//! What "the same device" means for new-device signals and drift: a user agent's browser family
//! and operating system (e.g. Chrome on Windows), not its version, which changes with every
//! update. Parsing is woothee's; this module only decides what to compare.

use std::sync::LazyLock;

use crate::model::session::Device;

static PARSER: LazyLock<woothee::parser::Parser> = LazyLock::new(woothee::parser::Parser::new);

/// A browser family on an operating system.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    pub browser: String,
    pub os: String,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} on {}", self.browser, self.os)
    }
}

const UNKNOWN: &str = "UNKNOWN";

/// The platform of a user agent; `None` when it says too little to compare (empty, unknown
/// browser and OS).
pub fn platform(user_agent: &str) -> Option<Platform> {
    if user_agent.is_empty() {
        return None;
    }
    let parsed = PARSER.parse(user_agent)?;
    if parsed.name == UNKNOWN && parsed.os == UNKNOWN {
        return None;
    }
    // "Windows 10" and "Windows 11" are one family: an upgrade is not another device.
    let os = match parsed.os {
        os if os.starts_with("Windows") && !os.starts_with("Windows Phone") => "Windows",
        os => os,
    };
    Some(Platform {
        browser: parsed.name.to_string(),
        os: os.to_string(),
    })
}

/// Whether a session created from `created` and now presented by a client with user agent
/// `presented` moved to another platform: both must be recognisable to say so.
pub fn platform_drift(created: &Device, presented: &str) -> Option<(Platform, Platform)> {
    if presented.is_empty() || presented == created.user_agent {
        return None;
    }
    let (from, to) = (platform(&created.user_agent)?, platform(presented)?);
    (from != to).then_some((from, to))
}

/// Whether the country moved: both must be known.
pub fn country_drift<'a>(created: &'a Device, presented: &'a Device) -> Option<(&'a str, &'a str)> {
    let from = created.location.as_ref().map(|l| l.country.as_str())?;
    let to = presented.location.as_ref().map(|l| l.country.as_str())?;
    (!from.is_empty() && !to.is_empty() && from != to).then_some((from, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHROME_WINDOWS: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36";
    const CHROME_WINDOWS_NEWER: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36";
    const FIREFOX_LINUX: &str =
        "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0";

    fn device(ua: &str) -> Device {
        Device {
            user_agent: ua.into(),
            ..Device::default()
        }
    }

    #[test]
    fn a_browser_update_is_the_same_platform_and_another_browser_is_not() {
        assert_eq!(
            platform(CHROME_WINDOWS).map(|p| p.to_string()).as_deref(),
            Some("Chrome on Windows")
        );
        assert_eq!(
            platform_drift(&device(CHROME_WINDOWS), CHROME_WINDOWS_NEWER),
            None
        );
        let (from, to) = platform_drift(&device(CHROME_WINDOWS), FIREFOX_LINUX).expect("drift");
        assert_eq!(
            (from.to_string(), to.to_string()),
            ("Chrome on Windows".into(), "Firefox on Linux".into())
        );
        // Nothing to compare with: no judgement.
        assert_eq!(platform_drift(&device(""), FIREFOX_LINUX), None);
        assert_eq!(platform_drift(&device(CHROME_WINDOWS), ""), None);
        assert_eq!(platform_drift(&device(CHROME_WINDOWS), "garbage"), None);
    }
}
