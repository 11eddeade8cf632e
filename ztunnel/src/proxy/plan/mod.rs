//! The proxy's decisions, made from the xDS state alone (no I/O): where an outbound
//! connection goes ([`plan_outbound`]) and what an inbound one may do ([`plan_inbound`]).

pub mod inbound;
pub mod outbound;

pub use inbound::{
    HboneConnect, InboundAction, InboundPlan, InboundRefusal, InboundRequest, plan_inbound,
};
pub use outbound::{OutboundPlan, OutboundRefusal, connect_failure_flags, is_loop, plan_outbound};

#[cfg(test)]
pub(crate) mod fixtures;
