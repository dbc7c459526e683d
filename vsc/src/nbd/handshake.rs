//! The fixed newstyle handshake and option haggling.

use std::io::{self, Read, Write};

use super::proto::*;
use super::Export;

/// At most this many options per connection; a client that goes on is disconnected.
const MAX_OPTIONS: usize = 256;

/// A protocol violation that ends the connection.
fn violation(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Runs the handshake on `s`. `Ok(Some(i))`: transmission on `exports[i]` follows; `Ok(None)`:
/// the client aborted. An error (including a protocol violation) ends the connection.
pub(crate) fn negotiate<S: Read + Write>(
    s: &mut S,
    exports: &[Export],
) -> io::Result<Option<usize>> {
    let mut hello = [0u8; 18];
    hello[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    hello[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    hello[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;

    let mut cflags = [0u8; 4];
    s.read_exact(&mut cflags)?;
    let cflags = u32::from_be_bytes(cflags);
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(violation(format!("unknown client flags {cflags:#x}")));
    }
    if cflags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(violation("client does not speak fixed newstyle"));
    }
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;

    for _ in 0..MAX_OPTIONS {
        let mut hdr = [0u8; 16];
        s.read_exact(&mut hdr)?;
        let magic = u64::from_be_bytes(hdr[0..8].try_into().unwrap());
        let opt = u32::from_be_bytes(hdr[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(hdr[12..16].try_into().unwrap());
        if magic != IHAVEOPT {
            return Err(violation(format!("bad option magic {magic:#x}")));
        }
        if len > MAX_OPTION_DATA {
            return Err(violation(format!("option {opt} with {len} bytes of data")));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        tracing::debug!(opt, len, "NBD option");

        match opt {
            OPT_EXPORT_NAME => {
                if data.len() > MAX_STRING {
                    return Err(violation("export name too long"));
                }
                let Some(i) = find_export(exports, &data) else {
                    // No error reply exists for this option: the session ends.
                    return Err(violation(format!(
                        "unknown export {:?}",
                        String::from_utf8_lossy(&data)
                    )));
                };
                let e = &exports[i];
                let mut reply = Vec::with_capacity(10 + 124);
                reply.extend_from_slice(&e.device.size().to_be_bytes());
                reply.extend_from_slice(&e.transmission_flags().to_be_bytes());
                if !no_zeroes {
                    reply.resize(reply.len() + 124, 0);
                }
                s.write_all(&reply)?;
                return Ok(Some(i));
            }
            OPT_ABORT => {
                // The client may already have gone: a failed ACK does not matter.
                let _ = option_reply(s, opt, REP_ACK, &[]);
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_reply(s, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                    continue;
                }
                for e in exports {
                    let mut d = Vec::with_capacity(4 + e.name.len() + e.description.len());
                    d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(e.name.as_bytes());
                    d.extend_from_slice(e.description.as_bytes());
                    option_reply(s, opt, REP_SERVER, &d)?;
                }
                option_reply(s, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                if let Some(i) = info(s, opt, &data, exports)? {
                    if opt == OPT_GO {
                        return Ok(Some(i));
                    }
                }
            }
            _ => {
                option_reply(s, opt, REP_ERR_UNSUP, b"option not supported")?;
            }
        }
    }
    Err(violation("too many options"))
}

/// Answers `NBD_OPT_INFO`/`NBD_OPT_GO`. `Some(i)`: success on `exports[i]`.
fn info<S: Write>(
    s: &mut S,
    opt: u32,
    data: &[u8],
    exports: &[Export],
) -> io::Result<Option<usize>> {
    // Data: u32 name length, name, u16 number of requests, u16 requests.
    let parsed = (|| {
        let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
        let name = data.get(4..4usize.checked_add(name_len)?)?;
        let rest = &data[4 + name_len..];
        let n = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
        let reqs = rest.get(2..)?;
        if reqs.len() != 2 * n {
            return None;
        }
        let reqs: Vec<u16> = reqs
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        Some((name, reqs))
    })();
    let Some((name, reqs)) = parsed else {
        option_reply(
            s,
            opt,
            REP_ERR_INVALID,
            b"malformed NBD_OPT_INFO/NBD_OPT_GO",
        )?;
        return Ok(None);
    };
    if name.len() > MAX_STRING {
        option_reply(s, opt, REP_ERR_TOO_BIG, b"export name too long")?;
        return Ok(None);
    }
    let Some(i) = find_export(exports, name) else {
        option_reply(s, opt, REP_ERR_UNKNOWN, b"no such export")?;
        return Ok(None);
    };
    let e = &exports[i];

    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&e.device.size().to_be_bytes());
    d.extend_from_slice(&e.transmission_flags().to_be_bytes());
    option_reply(s, opt, REP_INFO, &d)?;

    if reqs.contains(&INFO_NAME) {
        let mut d = INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(e.name.as_bytes());
        option_reply(s, opt, REP_INFO, &d)?;
    }
    if reqs.contains(&INFO_DESCRIPTION) && !e.description.is_empty() {
        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
        d.extend_from_slice(e.description.as_bytes());
        option_reply(s, opt, REP_INFO, &d)?;
    }
    // Block sizes are sent whether or not they were asked for (the protocol allows it); a client
    // that did not ask and sends unaligned requests gets EINVAL.
    let (min, pref, max) = e.block_sizes();
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    d.extend_from_slice(&min.to_be_bytes());
    d.extend_from_slice(&pref.to_be_bytes());
    d.extend_from_slice(&max.to_be_bytes());
    option_reply(s, opt, REP_INFO, &d)?;

    option_reply(s, opt, REP_ACK, &[])?;
    Ok(Some(i))
}

/// The export named `name`; the empty name is the first export.
fn find_export(exports: &[Export], name: &[u8]) -> Option<usize> {
    if name.is_empty() {
        return (!exports.is_empty()).then_some(0);
    }
    exports.iter().position(|e| e.name.as_bytes() == name)
}

/// Sends one option reply.
fn option_reply<S: Write>(s: &mut S, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b)
}
