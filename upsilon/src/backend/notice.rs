//! The holder's notice that its plan is done, carried by the notification of
//! its last write, so that a waiting node with the same plan inputs becomes
//! READY without reading the store.

use std::fmt;

use semver::Version;

/// What a plan depends on besides the store: the library's version, the app
/// version, the planner's settings and every registered task's key, order,
/// place and rollback. Two runners with the same digest plan the same steps
/// from the same store, and report READY from the same store, or both do
/// not. A 128-bit FNV-1a hash of a canonical text of those inputs: stable
/// across builds and platforms, so that every node of one release agrees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PlanDigest(pub u128);

impl PlanDigest {
    /// The digest of `parts`, each ended by a separator byte (0x1f) that no
    /// part holds in the texts the runner hashes (it writes them with
    /// `Debug`, which escapes control characters).
    pub fn of<'a>(parts: impl IntoIterator<Item = &'a str>) -> PlanDigest {
        let mut h = PlanHasher::new();
        for part in parts {
            h.part(format_args!("{part}"));
        }
        h.finish()
    }
}

/// Builds a [`PlanDigest`] from formatted parts without allocating.
#[derive(Debug, Clone)]
pub struct PlanHasher(u128);

impl PlanHasher {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;

    /// An empty digest.
    pub fn new() -> PlanHasher {
        PlanHasher(Self::OFFSET)
    }

    fn eat(&mut self, b: u8) {
        self.0 ^= u128::from(b);
        self.0 = self.0.wrapping_mul(Self::PRIME);
    }

    /// Adds one part, then the separator.
    pub fn part(&mut self, part: fmt::Arguments<'_>) {
        // Writing into the hash cannot fail.
        let _ = fmt::Write::write_fmt(self, part);
        self.eat(0x1f);
    }

    /// The digest of the parts so far.
    pub fn finish(&self) -> PlanDigest {
        PlanDigest(self.0)
    }
}

impl Default for PlanHasher {
    fn default() -> Self {
        PlanHasher::new()
    }
}

impl fmt::Write for PlanHasher {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(|b| self.eat(b));
        Ok(())
    }
}

impl fmt::Display for PlanDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// A holder's notice, sent only by a write that commits: once it commits,
/// the plan of every runner whose inputs have `plan`'s digest is empty, no
/// baseline or lagging data version needs the lease, and the data is
/// neither ahead of the app version nor holds tasks added out of order, so
/// such a runner reports READY at `data_version`, as a read of the store
/// right after that commit would have made it.
///
/// `fence` is the fence of the write. A notice is as new as any state read
/// under a fence at most its own: the holder's last write is its last under
/// that fence, and a later fence's writes come after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The fence of the write that carried it.
    pub fence: u64,
    /// The data version after that write.
    pub data_version: Option<Version>,
    /// The digest of the plan inputs of the node that wrote it.
    pub plan: PlanDigest,
}

/// The first field of an encoded notice; a payload that starts otherwise is
/// not one (older nodes send the service name alone).
const TAG: &str = "upsilon-notice-1";

impl Notice {
    /// The notice as one line of text for `service`, for a backend whose
    /// notifications carry text (PostgreSQL's `NOTIFY` payload, a Redis
    /// message): fields separated by `;`, which no service name, version or
    /// number holds.
    pub fn encode(&self, service: &str) -> String {
        let version = self
            .data_version
            .as_ref()
            .map_or_else(|| "-".to_owned(), Version::to_string);
        format!("{TAG};{};{};{};{}", self.fence, self.plan, version, service)
    }

    /// The service and the notice `text` holds, if it is one that
    /// [`Notice::encode`] wrote; `None` for any other text, so that a
    /// payload of another kind or version is only a wake-up.
    pub fn decode(text: &str) -> Option<(&str, Notice)> {
        let mut fields = text.splitn(5, ';');
        if fields.next()? != TAG {
            return None;
        }
        let fence = fields.next()?.parse().ok()?;
        let plan = fields.next()?;
        if plan.len() != 32 {
            return None;
        }
        let plan = PlanDigest(u128::from_str_radix(plan, 16).ok()?);
        let data_version = match fields.next()? {
            "-" => None,
            v => Some(Version::parse(v).ok()?),
        };
        let service = fields.next()?;
        Some((
            service,
            Notice {
                fence,
                data_version,
                plan,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notice_survives_its_text_and_other_text_is_not_one() {
        let notice = Notice {
            fence: 42,
            data_version: Some(Version::new(1, 2, 3)),
            plan: PlanDigest::of(["a", "b"]),
        };
        let text = notice.encode("orders;eu");
        assert_eq!(Notice::decode(&text), Some(("orders;eu", notice.clone())));
        let none = Notice {
            data_version: None,
            ..notice
        };
        assert_eq!(Notice::decode(&none.encode("s")), Some(("s", none)));
        for other in [
            "orders",
            "",
            "upsilon-notice-2;1;00000000000000000000000000000000;-;s",
            "upsilon-notice-1;x;00000000000000000000000000000000;-;s",
            "upsilon-notice-1;1;0000;-;s",
            "upsilon-notice-1;1;00000000000000000000000000000000;1.x;s",
            "upsilon-notice-1;1;00000000000000000000000000000000;-",
        ] {
            assert_eq!(Notice::decode(other), None, "{other:?}");
        }
    }

    #[test]
    fn the_digest_tells_the_parts_apart() {
        assert_ne!(PlanDigest::of(["ab", "c"]), PlanDigest::of(["a", "bc"]));
        assert_ne!(PlanDigest::of(["a"]), PlanDigest::of(["a", ""]));
        assert_eq!(PlanDigest::of(["a", "b"]), PlanDigest::of(["a", "b"]));
        // The published FNV-1a 128 of the empty input is the offset basis.
        assert_eq!(
            PlanDigest::of([]).to_string(),
            "6c62272e07bb014262b821756295c58d"
        );
    }
}
