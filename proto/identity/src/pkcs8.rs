//! Private keys in the PEM flavours CA tooling writes (PKCS#8, SEC1 `EC PRIVATE KEY`
//! from Helm's genCAWithKey / Go / `openssl ecparam`, PKCS#1 `RSA PRIVATE KEY` from
//! genCA), normalised to the PKCS#8 that ring signs with. SEC1 and PKCS#1 are wrapped in
//! a PKCS#8 envelope: the key bytes themselves are not touched.

use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_RSA_ENCRYPTION: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
];
const NULL: &[u8] = &[0x05, 0x00];

fn der(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = body.len();
    if n < 0x80 {
        out.push(n as u8);
    } else if n <= 0xff {
        out.extend([0x81, n as u8]);
    } else if n <= 0xffff {
        out.extend([0x82, (n >> 8) as u8, n as u8]);
    } else {
        out.extend([0x83, (n >> 16) as u8, (n >> 8) as u8, n as u8]);
    }
    out.extend_from_slice(body);
    out
}

/// Reads one DER element: (tag, content, rest).
fn element(input: &[u8]) -> Result<(u8, &[u8], &[u8]), String> {
    let short = || "truncated DER".to_string();
    let (&tag, rest) = input.split_first().ok_or_else(short)?;
    let (&first, rest) = rest.split_first().ok_or_else(short)?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let k = (first & 0x7f) as usize;
        if k == 0 || k > 3 || rest.len() < k {
            return Err("unsupported DER length".into());
        }
        let len = rest[..k].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
        (len, &rest[k..])
    };
    if rest.len() < len {
        return Err(short());
    }
    Ok((tag, &rest[..len], &rest[len..]))
}

/// The named curve in a SEC1 ECPrivateKey's `[0] parameters` (as an encoded OID).
fn sec1_curve(sec1: &[u8]) -> Result<Vec<u8>, String> {
    let (tag, mut body, _) = element(sec1)?;
    if tag != 0x30 {
        return Err("EC key is not a DER SEQUENCE".into());
    }
    while !body.is_empty() {
        let (tag, content, rest) = element(body)?;
        if tag == 0xa0 {
            let (oid_tag, _, _) = element(content)?;
            if oid_tag != 0x06 {
                return Err("EC key parameters are not a named curve".into());
            }
            return Ok(content.to_vec());
        }
        body = rest;
    }
    Err("EC key names no curve (no [0] parameters)".into())
}

fn wrap(algorithm: &[u8], key: &[u8]) -> Vec<u8> {
    let mut body = vec![0x02, 0x01, 0x00]; // version 0
    body.extend(der(0x30, algorithm));
    body.extend(der(0x04, key));
    der(0x30, &body)
}

/// The first private key in `pem`, as PKCS#8 DER.
pub fn private_key_to_pkcs8(pem: &str) -> Result<Vec<u8>, String> {
    let key = PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| format!("no private key in the PEM ({e})"))?;
    Ok(match key {
        PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        PrivateKeyDer::Sec1(k) => {
            let sec1 = k.secret_sec1_der();
            let mut alg = OID_EC_PUBLIC_KEY.to_vec();
            alg.extend(sec1_curve(sec1)?);
            wrap(&alg, sec1)
        }
        PrivateKeyDer::Pkcs1(k) => {
            let mut alg = OID_RSA_ENCRYPTION.to_vec();
            alg.extend_from_slice(NULL);
            wrap(&alg, k.secret_pkcs1_der())
        }
        _ => return Err("unsupported private key format".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Test keys written by `openssl ecparam -name prime256v1 -genkey -noout` and
    // `openssl genrsa -traditional 2048`, with their `openssl pkcs8 -topk8 -nocrypt` forms.
    const SEC1: &str = include_str!("../testdata/ec-sec1.pem");
    const PKCS8: &str = include_str!("../testdata/ec-pkcs8.pem");
    const PKCS1: &str = include_str!("../testdata/rsa-pkcs1.pem");
    const PKCS1_AS_PKCS8: &str = include_str!("../testdata/rsa-pkcs8.pem");

    fn public_key(pkcs8: Vec<u8>) -> String {
        rcgen::KeyPair::try_from(pkcs8)
            .expect("ring accepts the PKCS#8")
            .public_key_pem()
    }

    /// The wrapped key is the same key as openssl's PKCS#8 form (openssl also drops the
    /// inner curve parameters, so the bytes differ; both are valid PKCS#8).
    #[test]
    fn sec1_and_pkcs1_load_as_the_same_keys_as_their_pkcs8_forms() {
        for (legacy, pkcs8) in [(SEC1, PKCS8), (PKCS1, PKCS1_AS_PKCS8)] {
            assert_eq!(
                public_key(private_key_to_pkcs8(legacy).unwrap()),
                public_key(private_key_to_pkcs8(pkcs8).unwrap())
            );
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(private_key_to_pkcs8("not pem").is_err());
        let truncated =
            "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIA==\n-----END EC PRIVATE KEY-----\n";
        assert!(private_key_to_pkcs8(truncated).is_err());
        assert!(sec1_curve(&[0x30, 0x03, 0x02, 0x01, 0x01]).is_err());
        assert!(element(&[0x30, 0x85, 1, 2, 3, 4, 5]).is_err());
    }
}
