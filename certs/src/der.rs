//! A minimal DER reader for the few certificate fields this crate needs.
//!
//! rcgen can only sign with a CA whose subject name and key identifier it is
//! told; when a CA is loaded from PEM those come from its certificate. This
//! reader pulls out exactly that (subject, public key, subject key
//! identifier, basic constraints) and nothing more. It does not verify
//! anything: certificate verification is rustls's job.

/// Universal tags used below.
const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const BOOLEAN: u8 = 0x01;
const OCTET_STRING: u8 = 0x04;
const INTEGER: u8 = 0x02;
/// `[0]` and `[3]` explicit context tags in `TBSCertificate`.
const VERSION_TAG: u8 = 0xa0;
const EXTENSIONS_TAG: u8 = 0xa3;

/// DER content octets of the extension OIDs this reader looks at.
const SUBJECT_KEY_ID: &[u8] = &[0x55, 0x1d, 0x0e];
const BASIC_CONSTRAINTS: &[u8] = &[0x55, 0x1d, 0x13];

/// One attribute of a distinguished name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NameAttribute<'a> {
    /// The attribute type's OID, as arcs.
    pub(crate) oid: Vec<u64>,
    /// The value's ASN.1 string tag.
    pub(crate) tag: u8,
    /// The value's content octets.
    pub(crate) value: &'a [u8],
}

/// The fields of a certificate this crate reads.
#[derive(Debug)]
pub(crate) struct CertFields<'a> {
    /// The issuer name, full TLV.
    pub(crate) issuer: &'a [u8],
    /// The subject name, full TLV.
    pub(crate) subject: &'a [u8],
    /// The subject name's attributes, in order (one per RDN).
    pub(crate) subject_attributes: Vec<NameAttribute<'a>>,
    /// The SubjectPublicKeyInfo, full TLV.
    pub(crate) spki: &'a [u8],
    /// The subject key identifier extension's key identifier, if present.
    pub(crate) subject_key_id: Option<&'a [u8]>,
    /// Whether basic constraints say this is a CA.
    pub(crate) is_ca: bool,
}

/// Why a certificate could not be read.
pub(crate) type DerError = String;

/// One tag-length-value element.
struct Tlv<'a> {
    tag: u8,
    value: &'a [u8],
    whole: &'a [u8],
}

/// Reads consecutive elements from a byte slice.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn peek_tag(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    fn next(&mut self, what: &str) -> Result<Tlv<'a>, DerError> {
        let input = self.rest;
        let truncated = || format!("{what} is truncated");
        let (&tag, after_tag) = input.split_first().ok_or_else(truncated)?;
        if tag & 0x1f == 0x1f {
            return Err(format!("{what} uses an unsupported multi-byte tag"));
        }
        let (&first, mut after_len) = after_tag.split_first().ok_or_else(truncated)?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let count = usize::from(first & 0x7f);
            if count == 0 || count > 4 {
                return Err(format!("{what} has an unsupported length encoding"));
            }
            let (bytes, rest) = after_len.split_at_checked(count).ok_or_else(truncated)?;
            after_len = rest;
            bytes.iter().fold(0usize, |n, &b| (n << 8) | usize::from(b))
        };
        let (value, rest) = after_len.split_at_checked(len).ok_or_else(truncated)?;
        let header = input.len() - after_len.len();
        let whole = &input[..header + len];
        self.rest = rest;
        Ok(Tlv { tag, value, whole })
    }

    fn expect(&mut self, tag: u8, what: &str) -> Result<Tlv<'a>, DerError> {
        let tlv = self.next(what)?;
        if tlv.tag != tag {
            return Err(format!(
                "{what}: expected tag {tag:#04x}, found {:#04x}",
                tlv.tag
            ));
        }
        Ok(tlv)
    }
}

/// Decodes an OID's content octets into arcs.
fn oid_arcs(bytes: &[u8]) -> Result<Vec<u64>, DerError> {
    let mut arcs = Vec::new();
    let mut n: u64 = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if n > (u64::MAX >> 7) {
            return Err("an object identifier arc is too large".to_owned());
        }
        n = (n << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (n / 40).min(2);
                arcs.push(first);
                arcs.push(n - 40 * first);
            } else {
                arcs.push(n);
            }
            n = 0;
        } else if i + 1 == bytes.len() {
            return Err("an object identifier is truncated".to_owned());
        }
    }
    if arcs.is_empty() {
        return Err("an object identifier is empty".to_owned());
    }
    Ok(arcs)
}

/// Reads a distinguished name's attributes, one per RDN.
fn name_attributes<'a>(name: &'a [u8]) -> Result<Vec<NameAttribute<'a>>, DerError> {
    let mut rdns = Reader::new(name);
    let mut out = Vec::new();
    while !rdns.is_empty() {
        let rdn = rdns.expect(SET, "a relative distinguished name")?;
        let mut attrs = Reader::new(rdn.value);
        let attr = attrs.expect(SEQUENCE, "a name attribute")?;
        if !attrs.is_empty() {
            return Err("the name has a multi-valued RDN, which is not supported".to_owned());
        }
        let mut fields = Reader::new(attr.value);
        let oid = oid_arcs(fields.expect(OID, "a name attribute type")?.value)?;
        let value = fields.next("a name attribute value")?;
        out.push(NameAttribute {
            oid,
            tag: value.tag,
            value: value.value,
        });
    }
    Ok(out)
}

/// Reads the fields this crate needs from a DER certificate.
pub(crate) fn cert_fields(der: &[u8]) -> Result<CertFields<'_>, DerError> {
    let mut outer = Reader::new(der);
    let cert = outer.expect(SEQUENCE, "the certificate")?;
    if !outer.is_empty() {
        return Err("trailing bytes after the certificate".to_owned());
    }
    let mut cert = Reader::new(cert.value);
    let tbs = cert.expect(SEQUENCE, "the to-be-signed certificate")?;
    let mut tbs = Reader::new(tbs.value);
    if tbs.peek_tag() == Some(VERSION_TAG) {
        tbs.next("the version")?;
    }
    tbs.expect(INTEGER, "the serial number")?;
    tbs.expect(SEQUENCE, "the signature algorithm")?;
    let issuer = tbs.expect(SEQUENCE, "the issuer name")?.whole;
    tbs.expect(SEQUENCE, "the validity")?;
    let subject_tlv = tbs.expect(SEQUENCE, "the subject name")?;
    let spki = tbs.expect(SEQUENCE, "the subject public key info")?.whole;

    let mut subject_key_id = None;
    let mut is_ca = false;
    while !tbs.is_empty() {
        let field = tbs.next("an optional certificate field")?;
        if field.tag != EXTENSIONS_TAG {
            continue;
        }
        let mut wrapper = Reader::new(field.value);
        let list = wrapper.expect(SEQUENCE, "the extension list")?;
        let mut exts = Reader::new(list.value);
        while !exts.is_empty() {
            let ext = exts.expect(SEQUENCE, "an extension")?;
            let mut ext = Reader::new(ext.value);
            let oid = ext.expect(OID, "an extension identifier")?.value;
            if ext.peek_tag() == Some(BOOLEAN) {
                ext.next("an extension's critical flag")?;
            }
            let value = ext.expect(OCTET_STRING, "an extension value")?.value;
            if oid == SUBJECT_KEY_ID {
                let mut v = Reader::new(value);
                subject_key_id = Some(v.expect(OCTET_STRING, "the subject key identifier")?.value);
            } else if oid == BASIC_CONSTRAINTS {
                let mut v = Reader::new(value);
                let seq = v.expect(SEQUENCE, "the basic constraints")?;
                let mut seq = Reader::new(seq.value);
                if seq.peek_tag() == Some(BOOLEAN) {
                    let flag = seq.next("the basic constraints CA flag")?.value;
                    is_ca = flag.iter().any(|&b| b != 0);
                }
            }
        }
    }

    Ok(CertFields {
        issuer,
        subject: subject_tlv.whole,
        subject_attributes: name_attributes(subject_tlv.value)?,
        spki,
        subject_key_id,
        is_ca,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn oid_arcs_decode() {
        // 2.5.4.3 (commonName)
        assert_eq!(oid_arcs(&[0x55, 0x04, 0x03]).unwrap(), vec![2, 5, 4, 3]);
        // 1.2.840.113549.1.1.11
        assert_eq!(
            oid_arcs(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b]).unwrap(),
            vec![1, 2, 840, 113549, 1, 1, 11]
        );
        assert!(oid_arcs(&[]).is_err());
        assert!(oid_arcs(&[0x86]).is_err());
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        for bytes in [
            &[][..],
            &[0x30],
            &[0x30, 0x05, 0x01],
            &[0x30, 0x85, 1, 1, 1, 1, 1],
        ] {
            assert!(cert_fields(bytes).is_err());
        }
    }
}
