//! The layout oracle: checks our wire structs and enums against the layouts Linux 6.1 compiles
//! (`tests/data/linux-6.1-layouts.md`, read from the BTF of Debian's 6.1 cloud kernel modules).
//!
//! For every Linux struct we mirror, the Rust type's size and every field's offset and size
//! must match the file. Anonymous nested structs/unions (`(anonymous) {nested}`, keyed here as
//! `@<offset>`) are checked by offset only, since we may split them into several Rust fields.
//! Flexible array members (`name[]`, size 0) are checked to sit at the end of the Rust type.
//! Every struct in the file must be mirrored or listed in [`NOT_MIRRORED`] with a reason;
//! unions are not mirrored (their members are). Enums are checked value by value likewise.

use std::collections::{BTreeMap, BTreeSet};
use std::mem::offset_of;

use vmbus_proto::channel::*;
use vmbus_proto::netvsp::*;
use vmbus_proto::ring::*;
use vmbus_proto::rndis::*;
use vmbus_proto::storvsp::*;
use vmbus_proto::synic::*;

const LAYOUTS: &str = include_str!("data/linux-6.1-layouts.md");

/// Linux structs we deliberately do not mirror, and why.
const NOT_MIRRORED: &[(&str, &str)] = &[(
    "rndis_message",
    "the header plus a union of every body; mirrored as RndisMessageHeader and one type per body",
)];

/// Linux enums we deliberately do not mirror, and why.
const NOT_MIRRORED_ENUMS: &[(&str, &str)] = &[
    (
        "vmbus_connect_state",
        "hv_vmbus's own connection bookkeeping, never on the wire",
    ),
    (
        "rndis_device_state",
        "netvsc's own device state, never on the wire",
    ),
];

// ---------------------------------------------------------------------------------------------
// Parsing the layout file.

#[derive(Debug, Clone, PartialEq)]
struct Field {
    name: String,
    offset: usize,
    size: usize,
    nested: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct CStruct {
    is_union: bool,
    size: Option<usize>,
    fields: Vec<Field>,
}

#[derive(Debug, Default)]
struct Layouts {
    structs: BTreeMap<String, CStruct>,
    enums: BTreeMap<String, Vec<(String, u64)>>,
}

fn parse(text: &str) -> Result<Layouts, String> {
    let mut out = Layouts::default();
    let mut current_struct: Option<String> = None;
    let mut current_enum: Option<String> = None;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim_end();
        let err = |m: &str| format!("line {}: {m}: {line:?}", n + 1);
        if line.trim().is_empty() || line.starts_with("```") || line.starts_with('#') {
            current_struct = None;
            current_enum = None;
            continue;
        }
        let (kind, rest) = line.split_once(' ').unwrap_or((line, ""));
        if !raw.starts_with(' ') && (kind == "struct" || kind == "union") {
            // "struct NAME: size N" or "union NAME: size None", optionally "(packed)".
            let (name, tail) = rest
                .split_once(": size ")
                .ok_or_else(|| err("bad header"))?;
            let size_word = tail
                .split_whitespace()
                .next()
                .ok_or_else(|| err("no size"))?;
            let size = if size_word == "None" {
                None
            } else {
                Some(size_word.parse().map_err(|_| err("size"))?)
            };
            out.structs.insert(
                name.to_string(),
                CStruct {
                    is_union: kind == "union",
                    size,
                    fields: Vec::new(),
                },
            );
            current_struct = Some(name.to_string());
            continue;
        }
        if !raw.starts_with(' ') && kind == "enum" {
            let name = rest
                .strip_suffix(':')
                .ok_or_else(|| err("bad enum header"))?;
            out.enums.insert(name.to_string(), Vec::new());
            current_enum = Some(name.to_string());
            continue;
        }
        if let Some(e) = &current_enum {
            let (name, value) = line
                .trim()
                .split_once(" = ")
                .ok_or_else(|| err("bad enum line"))?;
            let value: u64 = value.trim().parse().map_err(|_| err("enum value"))?;
            out.enums
                .get_mut(e)
                .unwrap()
                .push((name.to_string(), value));
            continue;
        }
        if let Some(s) = &current_struct {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.len() < 3 {
                return Err(err("short field line"));
            }
            let offset_word = words[0];
            let offset: usize = offset_word
                .split(':')
                .next()
                .unwrap()
                .parse()
                .map_err(|_| err("field offset"))?;
            let size: usize = words[1].parse().map_err(|_| err("field size"))?;
            let last = *words.last().unwrap();
            let nested = last == "{nested}";
            let mut name = if nested { words[words.len() - 2] } else { last }.to_string();
            if name == "(anonymous)" {
                name = format!("@{offset}");
            }
            if let Some(i) = name.find(['[', ':']) {
                name.truncate(i);
            }
            out.structs.get_mut(s).unwrap().fields.push(Field {
                name,
                offset,
                size,
                nested,
            });
            continue;
        }
        // Prose outside code blocks.
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The mapping from Linux structs to ours.

struct Mirror {
    linux: &'static str,
    rust: &'static str,
    size: usize,
    /// (Linux field name, Rust offset, Rust field size).
    fields: Vec<(&'static str, usize, usize)>,
    /// Linux flexible array members that must sit at the end of the Rust type.
    tails: Vec<&'static str>,
}

fn field_size<T, F>(_: fn(&T) -> F) -> usize {
    size_of::<F>()
}

/// `mirror!("linux_name" => RustType { "linux_field" => rust.field.path, ... } tail "flex")`
macro_rules! mirror {
    ($linux:literal => $t:ty { $($lf:literal => $($rf:tt).+),* $(,)? } $(tail $tl:literal)?) => {
        Mirror {
            linux: $linux,
            rust: stringify!($t),
            size: size_of::<$t>(),
            fields: vec![
                $( ($lf, offset_of!($t, $($rf).+), field_size(|v: &$t| v.$($rf).+)), )*
            ],
            tails: vec![$($tl)?],
        }
    };
}

fn mirrors() -> Vec<Mirror> {
    vec![
        // VMBus (hv_vmbus.ko)
        mirror!("gpa_range" => GpaRangeHeader {
            "byte_count" => byte_count,
            "byte_offset" => byte_offset,
        } tail "pfn_array"),
        mirror!("hv_input_post_message" => HvPostMessageInput {
            "connectionid" => connection_id,
            "reserved" => reserved,
            "message_type" => message_type,
            "payload_size" => payload_size,
            "payload" => payload,
        }),
        mirror!("hv_message" => HvMessage {
            "header" => header,
            "u" => payload,
        }),
        mirror!("hv_message_header" => HvMessageHeader {
            "message_type" => message_type,
            "payload_size" => payload_size,
            "message_flags" => flags,
            "reserved" => reserved,
            "@8" => sender,
        }),
        mirror!("hv_monitor_page" => HvMonitorPage {
            "trigger_state" => trigger_state,
            "rsvdz1" => rsvdz1,
            "trigger_group" => trigger_group,
            "rsvdz2" => rsvdz2,
            "next_checktime" => next_check_time,
            "latency" => latency,
            "rsvdz3" => rsvdz3,
            "parameter" => parameter,
            "rsvdz4" => rsvdz4,
        }),
        mirror!("hv_monitor_parameter" => HvMonitorParameter {
            "connectionid" => connection_id,
            "flagnumber" => flag_number,
            "rsvdz" => reserved,
        }),
        mirror!("hv_ring_buffer" => RingControlPage {
            "write_index" => write_index,
            "read_index" => read_index,
            "interrupt_mask" => interrupt_mask,
            "pending_send_sz" => pending_send_size,
            "reserved1" => reserved1,
            "feature_bits" => feature_bits,
            "reserved2" => reserved2,
        } tail "buffer"),
        mirror!("vmbus_channel_close_channel" => CloseChannel {
            "header" => header,
            "child_relid" => child_relid,
        }),
        mirror!("vmbus_channel_gpadl_body" => GpadlBody {
            "header" => header,
            "msgnumber" => message_number,
            "gpadl" => gpadl,
        } tail "pfn"),
        mirror!("vmbus_channel_gpadl_created" => GpadlCreated {
            "header" => header,
            "child_relid" => child_relid,
            "gpadl" => gpadl,
            "creation_status" => creation_status,
        }),
        mirror!("vmbus_channel_gpadl_header" => GpadlHeader {
            "header" => header,
            "child_relid" => child_relid,
            "gpadl" => gpadl,
            "range_buflen" => range_buflen,
            "rangecount" => range_count,
        } tail "range"),
        mirror!("vmbus_channel_gpadl_teardown" => GpadlTeardown {
            "header" => header,
            "child_relid" => child_relid,
            "gpadl" => gpadl,
        }),
        mirror!("vmbus_channel_gpadl_torndown" => GpadlTorndown {
            "header" => header,
            "gpadl" => gpadl,
        }),
        mirror!("vmbus_channel_initiate_contact" => InitiateContact {
            "header" => header,
            "vmbus_version_requested" => vmbus_version_requested,
            "target_vcpu" => target_vcpu,
            "@16" => interrupt_page_or_target_info,
            "monitor_page1" => monitor_page1,
            "monitor_page2" => monitor_page2,
        }),
        mirror!("vmbus_channel_message_header" => MessageHeader {
            "msgtype" => message_type,
            "padding" => padding,
        }),
        mirror!("vmbus_channel_modifychannel" => ModifyChannel {
            "header" => header,
            "child_relid" => child_relid,
            "target_vp" => target_vp,
        }),
        mirror!("vmbus_channel_modifychannel_response" => ModifyChannelResponse {
            "header" => header,
            "child_relid" => child_relid,
            "status" => status,
        }),
        mirror!("vmbus_channel_offer" => ChannelOffer {
            "if_type" => interface_type,
            "if_instance" => interface_instance,
            "reserved1" => reserved1,
            "reserved2" => reserved2,
            "chn_flags" => flags,
            "mmio_megabytes" => mmio_megabytes,
            "u" => user_defined,
            "sub_channel_index" => subchannel_index,
            "reserved3" => reserved3,
        }),
        mirror!("vmbus_channel_offer_channel" => OfferChannel {
            "header" => header,
            "offer" => offer,
            "child_relid" => child_relid,
            "monitorid" => monitor_id,
            "monitor_allocated" => monitor_flags,
            "reserved" => monitor_flags,
            "is_dedicated_interrupt" => interrupt_flags,
            "reserved1" => interrupt_flags,
            "connection_id" => connection_id,
        }),
        mirror!("vmbus_channel_open_channel" => OpenChannel {
            "header" => header,
            "child_relid" => child_relid,
            "openid" => open_id,
            "ringbuffer_gpadlhandle" => ring_buffer_gpadl,
            "target_vp" => target_vp,
            "downstream_ringbuffer_pageoffset" => downstream_ring_buffer_page_offset,
            "userdata" => user_data,
        }),
        mirror!("vmbus_channel_open_result" => OpenResult {
            "header" => header,
            "child_relid" => child_relid,
            "openid" => open_id,
            "status" => status,
        }),
        mirror!("vmbus_channel_relid_released" => RelIdReleased {
            "header" => header,
            "child_relid" => child_relid,
        }),
        mirror!("vmbus_channel_rescind_offer" => RescindChannelOffer {
            "header" => header,
            "child_relid" => child_relid,
        }),
        mirror!("vmbus_channel_tl_connect_request" => TlConnectRequest {
            "header" => header,
            "guest_endpoint_id" => guest_endpoint_id,
            "host_service_id" => host_service_id,
        }),
        mirror!("vmbus_channel_version_response" => VersionResponse {
            "header" => header,
            "version_supported" => version_supported,
            "connection_state" => connection_state,
            "padding" => padding,
            "msg_conn_id" => msg_conn_id,
        }),
        mirror!("vmbus_channel_version_supported" => VersionSupported {
            "header" => header,
            "version_supported" => version_supported,
        }),
        mirror!("vmbus_packet_mpb_array" => GpaDirectPacketHeader {
            "type" => descriptor.packet_type,
            "dataoffset8" => descriptor.data_offset8,
            "length8" => descriptor.length8,
            "flags" => descriptor.flags,
            "transactionid" => descriptor.transaction_id,
            "reserved" => header.reserved,
            "rangecount" => header.range_count,
            "range" => range,
        }),
        mirror!("vmpacket_descriptor" => PacketDescriptor {
            "type" => packet_type,
            "offset8" => data_offset8,
            "len8" => length8,
            "flags" => flags,
            "trans_id" => transaction_id,
        }),
        // Storage (hv_storvsc.ko)
        mirror!("hv_fc_wwn_packet" => FcWwnPacket {
            "primary_active" => primary_active,
            "reserved1" => reserved1,
            "primary_port_wwn" => primary_port_wwn,
            "primary_node_wwn" => primary_node_wwn,
            "secondary_port_wwn" => secondary_port_wwn,
            "secondary_node_wwn" => secondary_node_wwn,
        }),
        mirror!("vmscsi_request" => ScsiRequest {
            "length" => length,
            "srb_status" => srb_status,
            "scsi_status" => scsi_status,
            "port_number" => port_number,
            "path_id" => path_id,
            "target_id" => target_id,
            "lun" => lun,
            "cdb_length" => cdb_length,
            "sense_info_length" => sense_info_length,
            "data_in" => data_in,
            "reserved" => reserved,
            "data_transfer_length" => data_transfer_length,
            "@16" => cdb_or_sense,
            "reserve" => reserve,
            "queue_tag" => queue_tag,
            "queue_action" => queue_action,
            "srb_flags" => srb_flags,
            "time_out_value" => time_out_value,
            "queue_sort_ey" => queue_sort_key,
        }),
        mirror!("vmstorage_channel_properties" => ChannelProperties {
            "reserved" => reserved,
            "max_channel_cnt" => max_channel_count,
            "reserved1" => reserved1,
            "flags" => flags,
            "max_transfer_bytes" => max_transfer_bytes,
            "reserved2" => reserved2,
        }),
        mirror!("vmstorage_protocol_version" => ProtocolVersion {
            "major_minor" => major_minor,
            "revision" => revision,
        }),
        mirror!("vstor_packet" => VstorPacket {
            "operation" => operation,
            "flags" => flags,
            "status" => status,
            "@12" => body,
        }),
        // Network (hv_netvsc.ko)
        mirror!("ndis_csum_offload" => NdisCsumOffload {
            "ip4_txenc" => ip4_tx_encap,
            "ip4_txcsum" => ip4_tx_csum,
            "ip4_rxenc" => ip4_rx_encap,
            "ip4_rxcsum" => ip4_rx_csum,
            "ip6_txenc" => ip6_tx_encap,
            "ip6_txcsum" => ip6_tx_csum,
            "ip6_rxenc" => ip6_rx_encap,
            "ip6_rxcsum" => ip6_rx_csum,
        }),
        mirror!("ndis_encap_offload" => NdisEncapOffload {
            "flags" => flags,
            "maxhdr" => max_header,
        }),
        mirror!("ndis_ipsecv1_offload" => NdisIpsecV1Offload {
            "encap" => encap,
            "ah_esp" => ah_esp,
            "xport_tun" => xport_tun,
            "ip4_opts" => ip4_opts,
            "flags" => flags,
            "ip4_ah" => ip4_ah,
            "ip4_esp" => ip4_esp,
        }),
        mirror!("ndis_ipsecv2_offload" => NdisIpsecV2Offload {
            "encap" => encap,
            "ip6" => ip6,
            "ip4opt" => ip4_opt,
            "ip6ext" => ip6_ext,
            "ah" => ah,
            "esp" => esp,
            "ah_esp" => ah_esp,
            "xport" => xport,
            "tun" => tun,
            "xport_tun" => xport_tun,
            "lso" => lso,
            "extseq" => ext_seq,
            "udp_esp" => udp_esp,
            "auth" => auth,
            "crypto" => crypto,
            "sa_caps" => sa_caps,
        }),
        mirror!("ndis_lsov1_offload" => NdisLsoV1Offload {
            "encap" => encap,
            "maxsize" => max_size,
            "minsegs" => min_segments,
            "opts" => opts,
        }),
        mirror!("ndis_lsov2_offload" => NdisLsoV2Offload {
            "ip4_encap" => ip4_encap,
            "ip4_maxsz" => ip4_max_size,
            "ip4_minsg" => ip4_min_segments,
            "ip6_encap" => ip6_encap,
            "ip6_maxsz" => ip6_max_size,
            "ip6_minsg" => ip6_min_segments,
            "ip6_opts" => ip6_opts,
        }),
        mirror!("ndis_obj_header" => NdisObjectHeader {
            "type" => object_type,
            "rev" => revision,
            "size" => size,
        }),
        mirror!("ndis_object_header" => NdisObjectHeader {
            "type" => object_type,
            "revision" => revision,
            "size" => size,
        }),
        mirror!("ndis_offload" => NdisOffload {
            "header" => header,
            "csum" => csum,
            "lsov1" => lsov1,
            "ipsecv1" => ipsecv1,
            "lsov2" => lsov2,
            "flags" => flags,
            "ipsecv2" => ipsecv2,
            "rsc" => rsc,
            "encap_gre" => encap_gre,
        }),
        mirror!("ndis_offload_params" => NdisOffloadParams {
            "header" => header,
            "ip_v4_csum" => ip_v4_csum,
            "tcp_ip_v4_csum" => tcp_ip_v4_csum,
            "udp_ip_v4_csum" => udp_ip_v4_csum,
            "tcp_ip_v6_csum" => tcp_ip_v6_csum,
            "udp_ip_v6_csum" => udp_ip_v6_csum,
            "lso_v1" => lso_v1,
            "ip_sec_v1" => ip_sec_v1,
            "lso_v2_ipv4" => lso_v2_ipv4,
            "lso_v2_ipv6" => lso_v2_ipv6,
            "tcp_connection_ip_v4" => tcp_connection_ip_v4,
            "tcp_connection_ip_v6" => tcp_connection_ip_v6,
            "flags" => flags,
            "ip_sec_v2" => ip_sec_v2,
            "ip_sec_v2_ip_v4" => ip_sec_v2_ip_v4,
            "@22" => rsc_ip_v4,
            "@24" => encapsulated_packet_task_offload,
        }),
        mirror!("ndis_pkt_8021q_info" => NdisPkt8021qInfo {
            "@0" => 0,
        }),
        mirror!("ndis_recv_scale_cap" => NdisRecvScaleCap {
            "hdr" => header,
            "cap_flag" => capabilities,
            "num_int_msg" => num_interrupt_messages,
            "num_recv_que" => num_recv_queues,
            "num_indirect_tabent" => num_indirect_table_entries,
        }),
        mirror!("ndis_recv_scale_param" => NdisRecvScaleParam {
            "hdr" => header,
            "flag" => flags,
            "base_cpu_number" => base_cpu_number,
            "hashinfo" => hash_info,
            "indirect_tabsize" => indirection_table_size,
            "indirect_taboffset" => indirection_table_offset,
            "hashkey_size" => hash_key_size,
            "hashkey_offset" => hash_key_offset,
            "processor_masks_offset" => processor_masks_offset,
            "num_processor_masks" => num_processor_masks,
            "processor_masks_entry_size" => processor_masks_entry_size,
        }),
        mirror!("ndis_rsc_offload" => NdisRscOffload {
            "ip4" => ip4,
            "ip6" => ip6,
        }),
        mirror!("ndis_tcp_ip_checksum_info" => NdisTcpIpChecksumInfo {
            "@0" => 0,
        }),
        mirror!("ndis_tcp_lso_info" => NdisTcpLsoInfo {
            "@0" => 0,
        }),
        mirror!("nvsp_1_message_revoke_receive_buffer" => RevokeReceiveBuffer {
            "id" => id,
        }),
        mirror!("nvsp_1_message_revoke_send_buffer" => RevokeSendBuffer {
            "id" => id,
        }),
        mirror!("nvsp_1_message_send_ndis_version" => SendNdisVersion {
            "ndis_major_ver" => ndis_major_version,
            "ndis_minor_ver" => ndis_minor_version,
        }),
        mirror!("nvsp_1_message_send_receive_buffer" => SendReceiveBuffer {
            "gpadl_handle" => gpadl_handle,
            "id" => id,
        }),
        mirror!("nvsp_1_message_send_receive_buffer_complete" => SendReceiveBufferComplete {
            "status" => status,
            "num_sections" => num_sections,
            "sections" => sections,
        }),
        mirror!("nvsp_1_message_send_rndis_packet" => SendRndisPacket {
            "channel_type" => channel_type,
            "send_buf_section_index" => send_buffer_section_index,
            "send_buf_section_size" => send_buffer_section_size,
        }),
        mirror!("nvsp_1_message_send_rndis_packet_complete" => SendRndisPacketComplete {
            "status" => status,
        }),
        mirror!("nvsp_1_message_send_send_buffer" => SendSendBuffer {
            "gpadl_handle" => gpadl_handle,
            "id" => id,
        }),
        mirror!("nvsp_1_message_send_send_buffer_complete" => SendSendBufferComplete {
            "status" => status,
            "section_size" => section_size,
        }),
        mirror!("nvsp_1_receive_buffer_section" => ReceiveBufferSection {
            "offset" => offset,
            "sub_alloc_size" => sub_alloc_size,
            "num_sub_allocs" => num_sub_allocs,
            "end_offset" => end_offset,
        }),
        mirror!("nvsp_2_alloc_rxbuf" => AllocRxBuf {
            "alloc_id" => alloc_id,
            "len" => len,
        }),
        mirror!("nvsp_2_alloc_rxbuf_comp" => AllocRxBufComplete {
            "status" => status,
            "alloc_id" => alloc_id,
            "gpadl_handle" => gpadl_handle,
            "recv_buf_id" => recv_buf_id,
        }),
        mirror!("nvsp_2_free_rxbuf" => FreeRxBuf {
            "recv_buf_id" => recv_buf_id,
        }),
        mirror!("nvsp_2_send_ndis_config" => SendNdisConfig {
            "mtu" => mtu,
            "reserved" => reserved,
            "capability" => capabilities,
        }),
        mirror!("nvsp_2_vsc_capability" => NvspCapabilities {
            "@0" => 0,
        }),
        mirror!("nvsp_4_send_vf_association" => SendVfAssociation {
            "allocated" => allocated,
            "serial" => serial,
        }),
        mirror!("nvsp_4_sw_datapath" => SwitchDataPath {
            "active_datapath" => active_datapath,
        }),
        mirror!("nvsp_5_send_indirect_table" => SendIndirectionTable {
            "count" => count,
            "offset" => offset,
        }),
        mirror!("nvsp_5_subchannel_complete" => SubchannelComplete {
            "status" => status,
            "num_subchannels" => num_subchannels,
        }),
        mirror!("nvsp_5_subchannel_request" => SubchannelRequest {
            "op" => op,
            "num_subchannels" => num_subchannels,
        }),
        mirror!("nvsp_6_pd_api_comp" => PdApiComplete {
            "op" => op,
            "status" => status,
            "@8" => data,
        }),
        mirror!("nvsp_6_pd_api_req" => PdApiRequest {
            "op" => op,
            "@4" => data,
        }),
        mirror!("nvsp_message" => NvspMessage {
            "hdr" => header,
            "msg" => body,
        }),
        mirror!("nvsp_message_header" => NvspMessageHeader {
            "msg_type" => message_type,
        }),
        mirror!("nvsp_message_init" => NvspInit {
            "min_protocol_ver" => min_protocol_version,
            "max_protocol_ver" => max_protocol_version,
        }),
        mirror!("nvsp_message_init_complete" => NvspInitComplete {
            "negotiated_protocol_ver" => negotiated_protocol_version,
            "max_mdl_chain_len" => max_mdl_chain_length,
            "status" => status,
        }),
        mirror!("rndis_config_parameter_info" => ConfigParameterInfo {
            "parameter_name_offset" => parameter_name_offset,
            "parameter_name_length" => parameter_name_length,
            "parameter_type" => parameter_type,
            "parameter_value_offset" => parameter_value_offset,
            "parameter_value_length" => parameter_value_length,
        }),
        mirror!("rndis_halt_request" => HaltRequest {
            "req_id" => request_id,
        }),
        mirror!("rndis_indicate_status" => IndicateStatus {
            "status" => status,
            "status_buflen" => status_buffer_length,
            "status_buf_offset" => status_buffer_offset,
        }),
        mirror!("rndis_initialize_complete" => InitializeComplete {
            "req_id" => request_id,
            "status" => status,
            "major_ver" => major_version,
            "minor_ver" => minor_version,
            "dev_flags" => device_flags,
            "medium" => medium,
            "max_pkt_per_msg" => max_packets_per_message,
            "max_xfer_size" => max_transfer_size,
            "pkt_alignment_factor" => packet_alignment_factor,
            "af_list_offset" => af_list_offset,
            "af_list_size" => af_list_size,
        }),
        mirror!("rndis_initialize_request" => InitializeRequest {
            "req_id" => request_id,
            "major_ver" => major_version,
            "minor_ver" => minor_version,
            "max_xfer_size" => max_transfer_size,
        }),
        mirror!("rndis_keepalive_complete" => KeepaliveComplete {
            "req_id" => request_id,
            "status" => status,
        }),
        mirror!("rndis_keepalive_request" => KeepaliveRequest {
            "req_id" => request_id,
        }),
        mirror!("rndis_packet" => RndisPacket {
            "data_offset" => data_offset,
            "data_len" => data_length,
            "oob_data_offset" => oob_data_offset,
            "oob_data_len" => oob_data_length,
            "num_oob_data_elements" => num_oob_data_elements,
            "per_pkt_info_offset" => per_packet_info_offset,
            "per_pkt_info_len" => per_packet_info_length,
            "vc_handle" => vc_handle,
            "reserved" => reserved,
        }),
        mirror!("rndis_per_packet_info" => PerPacketInfo {
            "size" => size,
            "type" => type_internal,
            "internal" => type_internal,
            "ppi_offset" => ppi_offset,
        }),
        mirror!("rndis_pktinfo_id" => PktInfoId {
            "ver" => version,
            "flag" => flag,
            "pkt_id" => packet_id,
        }),
        mirror!("rndis_query_complete" => QueryComplete {
            "req_id" => request_id,
            "status" => status,
            "info_buflen" => info_buffer_length,
            "info_buf_offset" => info_buffer_offset,
        }),
        mirror!("rndis_query_request" => QueryRequest {
            "req_id" => request_id,
            "oid" => oid,
            "info_buflen" => info_buffer_length,
            "info_buf_offset" => info_buffer_offset,
            "dev_vc_handle" => device_vc_handle,
        }),
        mirror!("rndis_reset_complete" => ResetComplete {
            "status" => status,
            "addressing_reset" => addressing_reset,
        }),
        mirror!("rndis_reset_request" => ResetRequest {
            "reserved" => reserved,
        }),
        mirror!("rndis_set_complete" => SetComplete {
            "req_id" => request_id,
            "status" => status,
        }),
        mirror!("rndis_set_request" => SetRequest {
            "req_id" => request_id,
            "oid" => oid,
            "info_buflen" => info_buffer_length,
            "info_buf_offset" => info_buffer_offset,
            "dev_vc_handle" => device_vc_handle,
        } tail "info_buf"),
    ]
}

// ---------------------------------------------------------------------------------------------
// The mapping from Linux enums to ours.

struct EnumMirror {
    linux: &'static str,
    values: Vec<(&'static str, u64)>,
    /// Sentinels (counts, maxima) we do not model.
    ignored: &'static [&'static str],
}

macro_rules! enum_mirror {
    ($linux:literal { $($name:literal => $value:expr),* $(,)? } $(ignore [$($ig:literal),*])?) => {
        EnumMirror {
            linux: $linux,
            values: vec![$( ($name, u64::from($value.0)), )*],
            ignored: &[$($($ig),*)?],
        }
    };
}

fn enum_mirrors() -> Vec<EnumMirror> {
    vec![
        enum_mirror!("hv_message_type" {
            "HVMSG_NONE" => HvMessageType::NONE,
            "HVMSG_UNMAPPED_GPA" => HvMessageType::UNMAPPED_GPA,
            "HVMSG_GPA_INTERCEPT" => HvMessageType::GPA_INTERCEPT,
            "HVMSG_TIMER_EXPIRED" => HvMessageType::TIMER_EXPIRED,
            "HVMSG_INVALID_VP_REGISTER_VALUE" => HvMessageType::INVALID_VP_REGISTER_VALUE,
            "HVMSG_UNRECOVERABLE_EXCEPTION" => HvMessageType::UNRECOVERABLE_EXCEPTION,
            "HVMSG_UNSUPPORTED_FEATURE" => HvMessageType::UNSUPPORTED_FEATURE,
            "HVMSG_EVENTLOG_BUFFERCOMPLETE" => HvMessageType::EVENTLOG_BUFFERCOMPLETE,
            "HVMSG_X64_IOPORT_INTERCEPT" => HvMessageType::X64_IOPORT_INTERCEPT,
            "HVMSG_X64_MSR_INTERCEPT" => HvMessageType::X64_MSR_INTERCEPT,
            "HVMSG_X64_CPUID_INTERCEPT" => HvMessageType::X64_CPUID_INTERCEPT,
            "HVMSG_X64_EXCEPTION_INTERCEPT" => HvMessageType::X64_EXCEPTION_INTERCEPT,
            "HVMSG_X64_APIC_EOI" => HvMessageType::X64_APIC_EOI,
            "HVMSG_X64_LEGACY_FP_ERROR" => HvMessageType::X64_LEGACY_FP_ERROR,
        }),
        enum_mirror!("vmbus_channel_message_type" {
            "CHANNELMSG_INVALID" => MessageType::INVALID,
            "CHANNELMSG_OFFERCHANNEL" => MessageType::OFFER_CHANNEL,
            "CHANNELMSG_RESCIND_CHANNELOFFER" => MessageType::RESCIND_CHANNEL_OFFER,
            "CHANNELMSG_REQUESTOFFERS" => MessageType::REQUEST_OFFERS,
            "CHANNELMSG_ALLOFFERS_DELIVERED" => MessageType::ALL_OFFERS_DELIVERED,
            "CHANNELMSG_OPENCHANNEL" => MessageType::OPEN_CHANNEL,
            "CHANNELMSG_OPENCHANNEL_RESULT" => MessageType::OPEN_CHANNEL_RESULT,
            "CHANNELMSG_CLOSECHANNEL" => MessageType::CLOSE_CHANNEL,
            "CHANNELMSG_GPADL_HEADER" => MessageType::GPADL_HEADER,
            "CHANNELMSG_GPADL_BODY" => MessageType::GPADL_BODY,
            "CHANNELMSG_GPADL_CREATED" => MessageType::GPADL_CREATED,
            "CHANNELMSG_GPADL_TEARDOWN" => MessageType::GPADL_TEARDOWN,
            "CHANNELMSG_GPADL_TORNDOWN" => MessageType::GPADL_TORNDOWN,
            "CHANNELMSG_RELID_RELEASED" => MessageType::RELID_RELEASED,
            "CHANNELMSG_INITIATE_CONTACT" => MessageType::INITIATE_CONTACT,
            "CHANNELMSG_VERSION_RESPONSE" => MessageType::VERSION_RESPONSE,
            "CHANNELMSG_UNLOAD" => MessageType::UNLOAD,
            "CHANNELMSG_UNLOAD_RESPONSE" => MessageType::UNLOAD_RESPONSE,
            "CHANNELMSG_18" => MessageType::MSG_18,
            "CHANNELMSG_19" => MessageType::MSG_19,
            "CHANNELMSG_20" => MessageType::MSG_20,
            "CHANNELMSG_TL_CONNECT_REQUEST" => MessageType::TL_CONNECT_REQUEST,
            "CHANNELMSG_MODIFYCHANNEL" => MessageType::MODIFY_CHANNEL,
            "CHANNELMSG_TL_CONNECT_RESULT" => MessageType::TL_CONNECT_RESULT,
            "CHANNELMSG_MODIFYCHANNEL_RESPONSE" => MessageType::MODIFY_CHANNEL_RESPONSE,
        } ignore ["CHANNELMSG_COUNT"]),
        enum_mirror!("vmbus_packet_type" {
            "VM_PKT_INVALID" => PacketType::INVALID,
            "VM_PKT_SYNCH" => PacketType::SYNCH,
            "VM_PKT_ADD_XFER_PAGESET" => PacketType::ADD_XFER_PAGESET,
            "VM_PKT_RM_XFER_PAGESET" => PacketType::RM_XFER_PAGESET,
            "VM_PKT_ESTABLISH_GPADL" => PacketType::ESTABLISH_GPADL,
            "VM_PKT_TEARDOWN_GPADL" => PacketType::TEARDOWN_GPADL,
            "VM_PKT_DATA_INBAND" => PacketType::DATA_INBAND,
            "VM_PKT_DATA_USING_XFER_PAGES" => PacketType::DATA_USING_XFER_PAGES,
            "VM_PKT_DATA_USING_GPADL" => PacketType::DATA_USING_GPADL,
            "VM_PKT_DATA_USING_GPA_DIRECT" => PacketType::DATA_USING_GPA_DIRECT,
            "VM_PKT_CANCEL_REQUEST" => PacketType::CANCEL_REQUEST,
            "VM_PKT_COMP" => PacketType::COMP,
            "VM_PKT_DATA_USING_ADDITIONAL_PKT" => PacketType::DATA_USING_ADDITIONAL_PKT,
            "VM_PKT_ADDITIONAL_DATA" => PacketType::ADDITIONAL_DATA,
        }),
        enum_mirror!("vstor_packet_operation" {
            "VSTOR_OPERATION_COMPLETE_IO" => VstorOperation::COMPLETE_IO,
            "VSTOR_OPERATION_REMOVE_DEVICE" => VstorOperation::REMOVE_DEVICE,
            "VSTOR_OPERATION_EXECUTE_SRB" => VstorOperation::EXECUTE_SRB,
            "VSTOR_OPERATION_RESET_LUN" => VstorOperation::RESET_LUN,
            "VSTOR_OPERATION_RESET_ADAPTER" => VstorOperation::RESET_ADAPTER,
            "VSTOR_OPERATION_RESET_BUS" => VstorOperation::RESET_BUS,
            "VSTOR_OPERATION_BEGIN_INITIALIZATION" => VstorOperation::BEGIN_INITIALIZATION,
            "VSTOR_OPERATION_END_INITIALIZATION" => VstorOperation::END_INITIALIZATION,
            "VSTOR_OPERATION_QUERY_PROTOCOL_VERSION" => VstorOperation::QUERY_PROTOCOL_VERSION,
            "VSTOR_OPERATION_QUERY_PROPERTIES" => VstorOperation::QUERY_PROPERTIES,
            "VSTOR_OPERATION_ENUMERATE_BUS" => VstorOperation::ENUMERATE_BUS,
            "VSTOR_OPERATION_FCHBA_DATA" => VstorOperation::FCHBA_DATA,
            "VSTOR_OPERATION_CREATE_SUB_CHANNELS" => VstorOperation::CREATE_SUB_CHANNELS,
        } ignore ["VSTOR_OPERATION_MAXIMUM"]),
        enum_mirror!("storvsc_request_type" {
            "WRITE_TYPE" => DataDirection::WRITE,
            "READ_TYPE" => DataDirection::READ,
            "UNKNOWN_TYPE" => DataDirection::UNKNOWN,
        }),
        enum_mirror!("nvsp_subchannel_operation" {
            "NVSP_SUBCHANNEL_NONE" => NvspSubchannelOperation::NONE,
            "NVSP_SUBCHANNEL_ALLOCATE" => NvspSubchannelOperation::ALLOCATE,
        } ignore ["NVSP_SUBCHANNEL_MAX"]),
        enum_mirror!("ndis_per_pkt_info_type" {
            "TCPIP_CHKSUM_PKTINFO" => PpiType::TCPIP_CHKSUM,
            "IPSEC_PKTINFO" => PpiType::IPSEC,
            "TCP_LARGESEND_PKTINFO" => PpiType::TCP_LARGESEND,
            "CLASSIFICATION_HANDLE_PKTINFO" => PpiType::CLASSIFICATION_HANDLE,
            "NDIS_RESERVED" => PpiType::NDIS_RESERVED,
            "SG_LIST_PKTINFO" => PpiType::SG_LIST,
            "IEEE_8021Q_INFO" => PpiType::IEEE_8021Q,
            "ORIGINAL_PKTINFO" => PpiType::ORIGINAL,
            "PACKET_CANCEL_ID" => PpiType::PACKET_CANCEL_ID,
            "NBL_HASH_VALUE" => PpiType::NBL_HASH_VALUE,
            "ORIGINAL_NET_BUFLIST" => PpiType::ORIGINAL_NET_BUFLIST,
            "CACHED_NET_BUFLIST" => PpiType::CACHED_NET_BUFLIST,
            "SHORT_PKT_PADINFO" => PpiType::SHORT_PKT_PADINFO,
        } ignore ["MAX_PER_PKT_INFO"]),
        enum_mirror!("rndis_per_pkt_info_interal_type" {
            "RNDIS_PKTINFO_ID" => InternalPpiType::PKTINFO_ID,
        } ignore ["RNDIS_PKTINFO_MAX"]),
        enum_mirror!("nvsp_vm_datapath" {
            "NVSP_DATAPATH_SYNTHETIC" => NvspDatapath::SYNTHETIC,
            "NVSP_DATAPATH_VF" => NvspDatapath::VF,
        } ignore ["NVSP_DATAPATH_MAX"]),
    ]
}

// ---------------------------------------------------------------------------------------------
// The checks. Each returns every discrepancy, so one run shows them all.

fn check_structs(layouts: &Layouts, mirrors: &[Mirror]) -> Vec<String> {
    let mut errors = Vec::new();
    let mut seen = BTreeSet::new();
    for m in mirrors {
        if !seen.insert(m.linux) {
            errors.push(format!("{} is mapped twice", m.linux));
        }
        let Some(c) = layouts.structs.get(m.linux) else {
            errors.push(format!(
                "{} ({}) is not in the layout file",
                m.linux, m.rust
            ));
            continue;
        };
        if c.size != Some(m.size) {
            errors.push(format!(
                "{}: Linux size {:?}, {} is {}",
                m.linux, c.size, m.rust, m.size
            ));
        }
        let mapped: BTreeMap<&str, (usize, usize)> =
            m.fields.iter().map(|&(n, o, s)| (n, (o, s))).collect();
        for f in &c.fields {
            if m.tails.contains(&f.name.as_str()) {
                if f.size != 0 || f.offset != m.size {
                    errors.push(format!(
                        "{}.{}: flexible array at {} (size {}), {} ends at {}",
                        m.linux, f.name, f.offset, f.size, m.rust, m.size
                    ));
                }
                continue;
            }
            let Some(&(offset, size)) = mapped.get(f.name.as_str()) else {
                errors.push(format!(
                    "{}.{} (offset {}) is not mapped",
                    m.linux, f.name, f.offset
                ));
                continue;
            };
            if offset != f.offset {
                errors.push(format!(
                    "{}.{}: Linux offset {}, {} has {}",
                    m.linux, f.name, f.offset, m.rust, offset
                ));
            }
            if !f.nested && size != f.size {
                errors.push(format!(
                    "{}.{}: Linux size {}, {} field has {}",
                    m.linux, f.name, f.size, m.rust, size
                ));
            }
        }
        for name in mapped.keys().chain(m.tails.iter()) {
            if !c.fields.iter().any(|f| f.name == *name) {
                errors.push(format!(
                    "{}: mapped field {name} is not in the layout file",
                    m.linux
                ));
            }
        }
    }
    // Coverage: every struct is mirrored or excused; unions are not mirrored.
    for (name, c) in &layouts.structs {
        let excused = NOT_MIRRORED.iter().any(|(n, _)| n == name);
        if !c.is_union && !seen.contains(name.as_str()) && !excused {
            errors.push(format!(
                "struct {name} is neither mirrored nor listed in NOT_MIRRORED"
            ));
        }
        if excused && seen.contains(name.as_str()) {
            errors.push(format!(
                "struct {name} is both mirrored and listed in NOT_MIRRORED"
            ));
        }
    }
    for (name, _) in NOT_MIRRORED {
        if !layouts.structs.contains_key(*name) {
            errors.push(format!(
                "NOT_MIRRORED names {name}, which the file does not have"
            ));
        }
    }
    errors
}

fn check_enums(layouts: &Layouts, mirrors: &[EnumMirror]) -> Vec<String> {
    let mut errors = Vec::new();
    for m in mirrors {
        let Some(values) = layouts.enums.get(m.linux) else {
            errors.push(format!("enum {} is not in the layout file", m.linux));
            continue;
        };
        for (name, value) in values {
            if m.ignored.contains(&name.as_str()) {
                continue;
            }
            match m.values.iter().find(|(n, _)| n == name) {
                None => errors.push(format!("{}::{name} = {value} is not mapped", m.linux)),
                Some((_, ours)) if ours != value => {
                    errors.push(format!("{}::{name}: Linux {value}, ours {ours}", m.linux))
                }
                Some(_) => {}
            }
        }
        for (name, _) in &m.values {
            if !values.iter().any(|(n, _)| n == name) {
                errors.push(format!(
                    "{}: mapped {name} is not in the layout file",
                    m.linux
                ));
            }
        }
    }
    for name in layouts.enums.keys() {
        let mirrored = mirrors.iter().any(|m| m.linux == name);
        let excused = NOT_MIRRORED_ENUMS.iter().any(|(n, _)| n == name);
        if !mirrored && !excused {
            errors.push(format!(
                "enum {name} is neither mirrored nor listed in NOT_MIRRORED_ENUMS"
            ));
        }
    }
    errors
}

fn check_all(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(layouts) => {
            let mut e = check_structs(&layouts, &mirrors());
            e.extend(check_enums(&layouts, &enum_mirrors()));
            e
        }
        Err(e) => vec![e],
    }
}

#[test]
fn layout_file_parses_completely() {
    let l = parse(LAYOUTS).unwrap();
    assert_eq!(l.structs.len(), 103, "structs and unions in the file");
    assert_eq!(l.enums.len(), 11);
    let offer = &l.structs["vmbus_channel_offer_channel"];
    assert_eq!(offer.size, Some(196));
    assert_eq!(offer.fields.len(), 9);
    assert_eq!(offer.fields[4].name, "monitor_allocated");
    assert_eq!(offer.fields[4].offset, 189);
    assert!(l.structs["hv_message_flags"].is_union);
    assert_eq!(l.structs["vmscsi_request"].fields[12].name, "@16");
}

#[test]
fn rust_types_match_linux_6_1() {
    let errors = check_all(LAYOUTS);
    assert!(
        errors.is_empty(),
        "{} mismatches:\n{}",
        errors.len(),
        errors.join("\n")
    );
}

#[test]
fn every_struct_field_is_checked() {
    // Guard against a mapping that silently checks little: count what was compared.
    let l = parse(LAYOUTS).unwrap();
    let mirrors = mirrors();
    let fields: usize = mirrors
        .iter()
        .map(|m| l.structs[m.linux].fields.len())
        .sum();
    let structs = l.structs.values().filter(|c| !c.is_union).count();
    assert_eq!(mirrors.len() + NOT_MIRRORED.len(), structs);
    assert_eq!(mirrors.len(), 91);
    assert!(fields >= 370, "only {fields} fields checked");
}

#[test]
fn a_different_file_is_caught() {
    let cases = [
        // A size.
        (
            "struct vmbus_channel_open_result: size 20",
            "struct vmbus_channel_open_result: size 24",
        ),
        // An offset.
        (
            "       12     4  u32 openid\n       16     4  u32 status",
            "       12     4  u32 openid\n       17     4  u32 status",
        ),
        // A field size.
        (
            "       16     2  u16 range_buflen",
            "       16     4  u32 range_buflen",
        ),
        // An enum value.
        (
            "CHANNELMSG_MODIFYCHANNEL = 22",
            "CHANNELMSG_MODIFYCHANNEL = 23",
        ),
        // A new field.
        (
            "        4     4  u32 padding\n",
            "        4     4  u32 padding\n        8     4  u32 extra\n",
        ),
        // A new struct.
        (
            "## Storage",
            "```\nstruct new_wire_thing: size 4\n        0     4  u32 x\n```\n## Storage",
        ),
        // A new enum value.
        (
            "  VM_PKT_ADDITIONAL_DATA = 13\n",
            "  VM_PKT_ADDITIONAL_DATA = 13\n  VM_PKT_NEW = 14\n",
        ),
    ];
    for (from, to) in cases {
        assert!(LAYOUTS.contains(from), "test case does not apply: {from:?}");
        let changed = LAYOUTS.replacen(from, to, 1);
        let errors = check_all(&changed);
        assert!(
            !errors.is_empty(),
            "change {from:?} -> {to:?} went unnoticed"
        );
    }
}
