#!/usr/bin/env python3
"""Seeds the local EC2-compatible endpoint (moto) through the EC2 API.
   moto_ec2.py URL create IP WORKLOAD   -> prints the new ENI id
   moto_ec2.py URL delete ENI_ID"""
import sys
import boto3

url, cmd = sys.argv[1], sys.argv[2]
ec2 = boto3.client("ec2", endpoint_url=url, region_name="us-east-1",
                   aws_access_key_id="test", aws_secret_access_key="test")
if cmd == "create":
    ip, workload = sys.argv[3], sys.argv[4]
    subnet = next(s for s in ec2.describe_subnets()["Subnets"] if s["CidrBlock"].startswith("172.31.0."))
    eni = ec2.create_network_interface(SubnetId=subnet["SubnetId"], PrivateIpAddress=ip,
        TagSpecifications=[{"ResourceType": "network-interface",
                            "Tags": [{"Key": "workload", "Value": workload}, {"Key": "team", "Value": workload + "-team"}]}])
    print(eni["NetworkInterface"]["NetworkInterfaceId"])
elif cmd == "delete":
    ec2.delete_network_interface(NetworkInterfaceId=sys.argv[3])
