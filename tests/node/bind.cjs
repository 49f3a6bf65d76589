// Preloaded with `node --require`: every TCP connection this process opens leaves from
// MP_SOURCE_ADDRESS (a loopback alias such as 127.0.0.5), so the proxy, which knows a VM by
// its connection's source address, sees this process as that VM. The client is unmodified:
// this wraps net.Socket.prototype.connect, the one call under http.Agent, undici and the Azure SDK.
'use strict';
const net = require('net');

const source = process.env.MP_SOURCE_ADDRESS;
if (source) {
  const connect = net.Socket.prototype.connect;
  net.Socket.prototype.connect = function (...args) {
    // net.createConnection passes its normalized [options, callback] array as the first argument.
    const options = Array.isArray(args[0]) ? args[0][0] : args[0];
    if (options && typeof options === 'object' && options.port !== undefined && !options.localAddress) {
      options.localAddress = source;
    }
    return connect.apply(this, args);
  };
}
